"""The compared systems: their losses and heads against hand-computed values, their samplers, and each one end to
end through make on the tiny world, with results.json recomputed from predictions.npz."""
import json
import math
import subprocess

import numpy as np
import pytest
import torch

import common
from conftest import ROOT, make_args
from systems import ballad, frame, imbalance_vlm as ivlm, lift


# ---- losses and heads, by hand ----

def test_balanced_softmax_by_hand():
    z, prior = torch.tensor([[1.0, 2.0]]), torch.tensor([0.8, 0.2])
    s0, s1 = 1 + math.log(0.8), 2 + math.log(0.2)  # z + log(pi)
    expected = math.log(1 + math.exp(s1 - s0))  # -log softmax(s)_0
    assert abs(ivlm.balanced_softmax(z, torch.tensor([0]), prior).item() - expected) < 1e-6


def test_focal_by_hand():
    p = math.exp(2) / (math.exp(2) + 1)
    expected = -(1 - p) ** 2 * math.log(p)  # 0.000180
    assert abs(ivlm.focal(torch.tensor([[2.0, 0.0]]), torch.tensor([0])).item() - expected) < 1e-7
    assert abs(ivlm.focal(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), gamma=0).item() + math.log(p)) < 1e-6


def test_ldam_margins_and_loss_by_hand():
    margins = ivlm.ldam_margins([16, 1])  # n^-1/4 = 0.5 and 1, scaled so the largest is 0.5
    assert torch.allclose(margins, torch.tensor([0.25, 0.5]))
    loss = ivlm.ldam(torch.tensor([[1.0, 1.0]]), torch.tensor([1]), margins)  # target logit 1 - 0.5
    assert abs(loss.item() - math.log(1 + math.exp(0.5))) < 1e-6


def test_lade_regulariser_by_hand():
    z, y, prior = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]), torch.tensor([0.5, 0.5])
    first = 1 + math.log(0.5)  # mean of z_c + log(pi_c) over the images of class c
    second = math.log(math.exp(1) + math.exp(0)) - math.log(2) - math.log(2)  # logsumexp(z - log C) - log B
    regulariser = -sum(0.5 * (first - second - 0.1 * second ** 2) for _ in range(2))
    expected = math.log(1 + math.exp(-1)) + 0.1 * regulariser  # CE of the shifted logits + 0.1 x regulariser
    assert abs(ivlm.lade(z, y, prior).item() - expected) < 1e-6


def test_reweighting_by_hand():
    prior = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert torch.allclose(ivlm.class_weights(prior, "cbw"), torch.tensor([1 / 1.5, 1 / 0.5]))  # 1 / (C pi)
    grw = torch.tensor([0.75 ** -1.2, 0.25 ** -1.2])
    assert torch.allclose(ivlm.class_weights(prior, "grw"), grw / grw.sum() * 2)  # pi^-1.2, mean 1


def second_stage(kind):
    linear = torch.nn.Linear(2, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))  # row norms 5 and 1
        linear.bias.copy_(torch.tensor([0.5, -0.5]))
    return ivlm.SecondStage(kind, linear), linear


def test_second_stages_by_hand():
    f = torch.tensor([[1.0, 1.0]])
    z = torch.tensor([[7.5, 0.5]])  # W f + b
    head, linear = second_stage("lws")
    with torch.no_grad():
        head.scale.copy_(torch.tensor([2.0, 3.0]))
    assert torch.allclose(head(f), torch.tensor([[15.0, 1.5]]))
    head, _ = second_stage("marc")
    with torch.no_grad():
        head.a.copy_(torch.tensor([2.0, 1.0]))
        head.shift.copy_(torch.tensor([0.1, 0.3]))
    assert torch.allclose(head(f), torch.tensor([[2 * 7.5 + 0.1 * 5, 0.5 + 0.3 * 1]]))
    head, _ = second_stage("disalign")
    with torch.no_grad():
        head.confidence.weight.zero_()
        head.confidence.bias.fill_(0.0)  # sigma(0) = 0.5
        head.scale.copy_(torch.tensor([2.0, 0.0]))
        head.shift.copy_(torch.tensor([1.0, -1.0]))
    assert torch.allclose(head(f), torch.tensor([[(1 + 0.5 * 2) * 7.5 + 0.5, 0.5 - 0.5]]))
    head, _ = second_stage("crt")
    assert torch.allclose(head(f), z) and head.classifier.weight.requires_grad
    assert not second_stage("marc")[0].classifier.weight.requires_grad  # the stage-1 classifier stays frozen


def test_adapter_residual_mix():
    f = torch.tensor([[1.0, 2.0]])
    code = ballad.Adapter(2, ratio=0.2, kind="code")
    paper = ballad.Adapter(2, ratio=0.2, kind="paper")
    with torch.no_grad():
        code.linear.weight.copy_(2 * torch.eye(2))
        paper.linear.weight.copy_(-torch.eye(2))
        paper.linear.bias.copy_(torch.tensor([3.0, 0.0]))
    assert code.linear.bias is None and torch.allclose(code(f), 0.2 * 2 * f + 0.8 * f)
    assert torch.allclose(paper(f), torch.tensor([[0.2 * 2.0 + 0.8, 0.2 * 0.0 + 1.6]]))  # ReLU(-f + b)


def test_class_aware_sampler_counts():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2])
    batches = frame.class_aware_batches(labels, 3, 4, 5, 6, torch.Generator().manual_seed(0))
    drawn = torch.cat(batches)
    assert len(batches) == 6 and len(drawn) == 30  # the asked number of batches (BALLAD: int(N / batch))
    per_class = torch.bincount(labels[drawn], minlength=3).tolist()
    assert all(8 <= n <= 12 for n in per_class), per_class  # every class about equally often (4 per visit)
    visits = labels[drawn].view(-1, 2)  # runs of 4 from one class: any aligned pair comes from one class
    assert (visits[:, 0] == visits[:, 1]).all()
    ones = [i for i in drawn.tolist() if labels[i] == 1]  # class 1 has images 10, 11, 12
    for k in range(0, len(ones) - 2, 3):  # each image of a class once before any repeats
        assert sorted(ones[k:k + 3]) == [10, 11, 12], ones


def test_weighted_sampler_balances_classes():
    labels = torch.tensor([0] * 90 + [1] * 10)
    drawn = torch.cat(frame.weighted_batches(labels, [1 / 90, 1 / 10], 100, 10000, torch.Generator().manual_seed(0)))
    assert len(drawn) == 10000 and 0.46 < labels[drawn].float().mean().item() < 0.54


def test_decoder_shapes_and_what_it_trains(tiny_world):
    clip, _, _, _ = common.load_clip(f"{tiny_world}/tiny-clip.json", "none")
    visual = clip.visual
    decoder = ivlm.Decoder(64, 5, depth=3, heads=4, mlp_ratio=0.5)
    assert len(decoder.blocks) == 3 and decoder.blocks[0].mlp.c_fc.out_features == 32  # width 64 x 0.5
    assert decoder.blocks[0].attn.in_proj_bias is not None  # qkv bias
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = ivlm.tower_tokens(visual, images)
    assert tokens.shape == (3, 1 + 16, 64)  # every token, before ln_post and the projection (width, not embed dim)
    logits = decoder(tokens)
    assert logits.shape == (3, 5)
    logits.sum().backward()
    assert all(p.grad is None for p in visual.parameters()) and all(p.grad is not None for p in decoder.parameters())


# ---- end to end through make on the tiny world ----

def recompute(pred, labels, counts):
    groups = np.where(counts > 100, 0, np.where(counts >= 20, 1, 2))
    per_class = {c: np.mean(pred[labels == c] == c) for c in np.unique(labels)}
    out = {"overall": round(100 * np.mean(pred == labels), 2)}
    for g, name in enumerate(("many", "medium", "few")):
        accs = [a for c, a in per_class.items() if groups[c] == g]
        out[name] = round(100 * np.mean(accs), 2) if accs else None
    return out


def system_args(world, run):  # EPOCHS on the command line (2 in make_args) sets every phase of every system
    return make_args(world, run) + ["SYSTEM_ARGS=--batch-size 8 --workers 0"]


@pytest.fixture(scope="module")
def systems_run(made_run, tiny_world):
    for name in ("ballad", "imbalance_vlm", "vl_ltr", "lt_dpt", "lift"):
        out = subprocess.run(["make", "-C", str(ROOT), "system", f"NAME={name}"] + system_args(tiny_world, made_run),
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    again = subprocess.run(["make", "-C", str(ROOT), "-n", "compare"] + system_args(tiny_world, made_run),
                           capture_output=True, text=True)
    assert again.returncode == 0 and "-m systems." not in again.stdout, again.stdout  # each recorded its params
    return made_run


@pytest.mark.parametrize("name, variants", [("ballad", ["ballad_phase_a", "ballad"]),
                                            ("imbalance_vlm", ["ivlm_ce", "ivlm_ce_disalign", "ivlm_ce_marc"]),
                                            ("vl_ltr", ["vl_ltr_lgr", "vl_ltr_linear", "vl_ltr_text"]),
                                            ("lt_dpt", ["lt_dpt"]), ("lift", ["lift", "lift_tte"])])
def test_system_results_recompute_from_predictions(systems_run, name, variants):
    folder = systems_run / "systems" / name
    results = json.loads((folder / "results.json").read_text())
    assert list(results["variants"]) == variants and results["shot_rule"] == "lift"
    assert results["meta"]["args"]["epochs"] == 2 and results["meta"]["dataset"] == "tiny"
    z = np.load(folder / "predictions.npz")
    counts = z["class_counts"]
    assert np.array_equal(counts, torch.load(systems_run / "coarse.pt", weights_only=True)["class_counts"].numpy())
    for variant in variants:
        assert results["variants"][variant] == recompute(z[f"pred_{variant}"], z["labels"], counts), variant
    assert (folder / "log.jsonl").exists() and (folder / "results.md").exists()
    training = results["training"]  # the budget the comparison shows: steps, lr, parameters, weights tested
    assert training["optimizer_steps"] and training["trainable_params"] and training["selection"] == "last"


def test_system_resume_repeats_the_uninterrupted_run(made_run, tiny_world, tmp_path, monkeypatch):
    args = ["--dataset", "tiny", "--data-root", str(tiny_world), "--features", str(made_run / "text_features.pt"),
            "--model", f"{tiny_world}/tiny-clip.json", "--pretrained", "none", "--epochs", "2", "--batch-size", "8",
            "--workers", "0"]
    ballad.main(args + ["--out", str(tmp_path / "full")])
    real = common.append_line

    def killed_in_phase_b(path, line):
        real(path, line)
        if json.loads(line)["phase"] == "phase_b" and json.loads(line)["epoch"] == 1:
            raise KeyboardInterrupt  # last.pt and the log hold phase B's first epoch

    monkeypatch.setattr(common, "append_line", killed_in_phase_b)
    with pytest.raises(KeyboardInterrupt):
        ballad.main(args + ["--out", str(tmp_path / "killed")])
    monkeypatch.setattr(common, "append_line", real)
    assert (tmp_path / "killed" / "phase_a.pt").exists() and not (tmp_path / "killed" / "phase_b.pt").exists()
    common.release_run_locks()
    with pytest.raises(SystemExit, match=r"--lr-b: 0.2 in .*killed/last.pt, 0.1 now"):
        ballad.main(args + ["--out", str(tmp_path / "killed"), "--resume", "--lr-b", "0.1"])
    ballad.main(args + ["--out", str(tmp_path / "killed"), "--resume"])
    a = np.load(tmp_path / "full" / "predictions.npz")
    b = np.load(tmp_path / "killed" / "predictions.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a.files)
    a = torch.load(tmp_path / "full" / "phase_b.pt", weights_only=True)["modules"]["adapter"]
    b = torch.load(tmp_path / "killed" / "phase_b.pt", weights_only=True)["modules"]["adapter"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    phases = [json.loads(line)["phase"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert phases == ["phase_a", "phase_a", "phase_b", "phase_b"]


def test_comparison_table_lists_every_system(systems_run, tiny_world):
    out = subprocess.run(["make", "-C", str(ROOT), "table1"] + system_args(tiny_world, systems_run),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = (systems_run / "tables" / "table1.md").read_text()
    for row in ("Zero-shot CLIP", "CLIP + linear probe", "VPT (CLIP, cross-entropy)", "BALLAD: phase A + balanced adapter",
                "Imbalance-VLM: cross-entropy + DisAlign, two stages", "VL-LTR: CVLP + LGR (both branches)",
                "LT-DPT: decoupled prompts, GCL + DRW",
                "LIFT: adaptformer + test-time ensembling (not in the HLC paper)", "HLC"):
        assert f"| {row} |" in text, row
    assert "paper Many" not in text  # the tiny world has no published numbers


# ---- VL-LTR and LT-DPT: losses, heads and parts by hand ----

from systems import lt_dpt, vl_ltr  # noqa: E402


def test_ccl_and_distillation_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    logits = 10 * image @ text.T
    target = torch.tensor([[1, 0, 0], [0, 0.5, 0.5], [0, 0.5, 0.5]])  # same-class items share the target

    def smooth(l, t, e=0.1):
        log_p = torch.log_softmax(l, -1)
        return sum((1 - e) * -(t[i] * log_p[i]).sum() + e * -log_p[i].mean() for i in range(3)) / 3

    expected = 0.5 * (smooth(logits, target) + smooth(logits.T, target))
    assert torch.allclose(vl_ltr.ccl_loss(image, text, labels, 10.0), expected)
    teacher = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0]])
    one_way = lambda s, t: sum(-(torch.softmax(t[i], -1) * torch.log_softmax(s[i], -1)).sum() for i in range(3)) / 3
    expected = 0.5 * (one_way(logits, teacher) + one_way(logits.T, teacher.T))
    assert torch.allclose(vl_ltr.distill_loss(logits, teacher), expected)


def test_anss_keeps_the_sentences_that_pick_out_their_class():
    images = torch.tensor([[1.0, 0.0], [0.9, 0.436], [0.0, 1.0], [0.2, 0.98]])
    image_labels = torch.tensor([0, 0, 1, 1])
    sentences = torch.tensor([[1.0, 0.0],  # class 0, points at class 0's images
                              [0.0, 1.0],  # class 0, points at class 1's images: a bad anchor
                              [0.7071, 0.7071],  # class 0, in between
                              [0.0, 1.0]])  # class 1
    labels = torch.tensor([0, 0, 0, 1])
    scores = vl_ltr.anss_scores(sentences, labels, images, image_labels, 10.0)
    logits = 10 * sentences[0] @ images.T
    assert abs(scores[0].item() + torch.log_softmax(logits, -1)[:2].mean().item()) < 1e-5  # by hand: -mean log p
    assert scores[0] < scores[2] < scores[1]
    anchors, mask = vl_ltr.select_anchors(sentences, labels, images, image_labels, 10.0, 2, keep=2)
    assert torch.equal(anchors[0], sentences[[0, 2]]) and mask.tolist() == [[True, True], [True, False]]


def test_anss_scores_each_class_on_the_device_of_the_images(monkeypatch):
    """On a GPU the labels of a class's sentences were made on the CPU and met the images' labels on the GPU: the
    comparison fails there, never on a CPU. The meta device stands in for the GPU (it checks devices, holds no values):
    the real scorer runs on it, and a stand-in ranking of the CPU's sentences is returned."""
    images, image_labels = torch.eye(2)[[0, 0, 1, 1]], torch.tensor([0, 0, 1, 1])
    sentences, labels = torch.eye(2)[[0, 1, 1]], torch.tensor([0, 0, 1])
    devices, real = [], vl_ltr.anss_scores

    def scores_on_meta(s, s_labels, i, i_labels, scale):
        devices.append({t.device.type for t in (s, s_labels, i, i_labels)})
        assert real(s, s_labels, i, i_labels, scale).shape == (len(s),)
        return torch.arange(len(s), dtype=torch.float32)

    monkeypatch.setattr(vl_ltr, "anss_scores", scores_on_meta)
    anchors, mask = vl_ltr.select_anchors(sentences, labels, images.to("meta"), image_labels.to("meta"), 10.0, 2, 2)
    assert devices == [{"meta"}, {"meta"}] and mask.tolist() == [[True, True], [True, False]]
    assert anchors.device.type == "cpu" and torch.equal(anchors[0], sentences[:2])


def test_lgr_language_branch_equals_the_explicit_gather():
    torch.manual_seed(0)
    anchors = F_normalize(torch.randn(3, 4, 8))
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True, False, False, False]])
    head = vl_ltr.LGR(anchors, mask, 3, scale=100.0)  # the CVLP model's learned exp(s), CLIP's about 100
    with torch.no_grad():
        head.w_q.weight.add_(0.1 * torch.randn(8, 8))
    f = torch.randn(5, 8)
    image_logits, text_logits = head(f)
    q, k = head.w_q(head.norm_q(f)), head.w_k(head.norm_k(anchors))  # Eqs. 4-6, with G formed
    att = torch.einsum("bd,cmd->bcm", q, k) / 8 ** 0.5
    att = torch.softmax(att.masked_fill(~mask, float("-inf")), -1)
    g = torch.einsum("bcm,cmd->bcd", att, anchors)
    expected = 100.0 * torch.nn.functional.cosine_similarity(f[:, None, :], g, dim=-1)  # not 1 / 0.07
    assert torch.allclose(text_logits, expected, atol=1e-5) and image_logits.shape == (5, 3)
    assert torch.equal(head.w_k.weight, torch.eye(8))  # initialised to the identity
    assert isinstance(head.mlp[0], torch.nn.Linear) and head.mlp[0].out_features == 32  # Linear(D, 4D)-ReLU-Linear


def F_normalize(x):
    return torch.nn.functional.normalize(x, dim=-1)


def test_gcl_drw_and_orthogonality_by_hand(tiny_world):
    margins = lt_dpt.gcl_margins([100, 10, 1])  # log n_max - log n_c
    assert torch.allclose(margins, torch.tensor([0.0, math.log(10), math.log(100)]))
    cosine, y = torch.tensor([[0.5, 0.2, 0.1]]), torch.tensor([1])
    noise = torch.tensor([[0.3, -0.6, 0.9]])
    shifted = [0.5, 0.2 - 0.5 * 0.6 * math.log(10) / math.log(100), 0.1 - 0.5 * 0.9]  # noise_mul |noise| m / max m
    expected = -math.log(math.exp(25 * shifted[1]) / sum(math.exp(25 * s) for s in shifted))
    assert abs(lt_dpt.gcl_loss(cosine, y, margins, 25.0, 0.5, noise=noise).item() - expected) < 1e-4
    w = lt_dpt.effective_number_weights([100, 1], beta=0.9)
    raw = [(1 - 0.9) / (1 - 0.9 ** 100), (1 - 0.9) / (1 - 0.9)]
    assert torch.allclose(w, torch.tensor([2 * r / sum(raw) for r in raw]))
    clip, _, _, _ = common.load_clip(f"{tiny_world}/tiny-clip.json", "none")
    model = lt_dpt.DecoupledPrompts(clip.visual, n_fg=2, n_bg=1, groups=3, top_k=2, bg_layers=1)
    with torch.no_grad():
        model.groups.zero_()
        model.groups[0, 0, 0, 0], model.groups[0, 1, 0, 1], model.groups[0, 2, 0, 0] = 1.0, 1.0, -1.0
    # pairs (0,1) and (1,2) orthogonal, (0,2) opposite: |cos| sums to 2 x 1 over the ordered pairs
    assert abs(model.orthogonality().item() - 2.0) < 1e-6


def test_group_mixing_and_bias_layout_by_hand():
    patches = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # (B=1, P=2, w=2)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # cosines with the patches: 1, 0, 0.6
    groups = torch.arange(3.0).view(3, 1, 1).expand(3, 1, 2)  # group g holds the value g
    mixed = lt_dpt.mix_groups(patches, keys, groups, top_k=2)  # groups 0 and 2, softmax of (1, 0.6)
    p0 = math.exp(1) / (math.exp(1) + math.exp(0.6))
    assert torch.allclose(mixed, torch.full((1, 1, 2), p0 * 0 + (1 - p0) * 2))
    saliency = torch.tensor([[0.0, 1.0]])
    bias = lt_dpt.attention_bias(saliency, torch.tensor(2.0), torch.tensor(3.0), n_fg=1, n_bg=1, heads=2)
    assert bias.shape == (2, 5, 5) and torch.equal(bias[0], bias[1])
    expected = torch.zeros(5, 5)
    expected[1, 3:] = torch.tensor([0.0, 2.0])  # foreground row: alpha * S on the patch columns
    expected[2, 3:] = torch.tensor([3.0, 0.0])  # background row: beta * (1 - S)
    assert torch.equal(bias[0], expected)


def test_block_with_a_zero_bias_is_the_plain_block():
    clip, _, _, _ = common.load_clip("ViT-B-16-quickgelu", "none")
    block = clip.visual.transformer.resblocks[0]
    x = torch.randn(2, 7, 768)
    zero = torch.zeros(2 * block.attn.num_heads, 7, 7)
    with torch.no_grad():
        assert torch.allclose(block(x, attn_mask=zero), block(x), atol=1e-5)
        bias = zero.clone()
        bias[:, 1, 2:] = 5.0
        assert not torch.allclose(block(x, attn_mask=bias)[:, 1], block(x)[:, 1], atol=1e-3)  # the bias acts
        assert torch.allclose(block(x, attn_mask=bias)[:, 0], block(x)[:, 0], atol=1e-5)  # on its row only


def test_saliency_lands_on_the_one_bright_object():
    image = 0.2 * torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # a textured dark field
    image[:, :, 40:52, 8:20] += 0.8  # and one bright square in the lower left
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    s = lt_dpt.spectral_residual_saliency(image, mean, std, grid=4)
    assert s.shape == (1, 16) and s.min() == 0 and abs(s.max().item() - 1) < 1e-6
    row, col = divmod(int(s.argmax()), 4)
    assert row in (2, 3) and col in (0, 1), (row, col)  # one of the four cells the square covers
    assert s.view(4, 4)[0, 3] < 0.2  # the far corner is not salient


def test_compare_shows_each_methods_budget(systems_run, tiny_world):
    out = subprocess.run(["make", "-C", str(ROOT), "compare"] + system_args(tiny_world, systems_run),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = (systems_run / "tables" / "compare.md").read_text()
    assert "| | optimizer steps | learning rate | trainable parameters | weights tested |" in text
    for name in ("BALLAD", "Imbalance-VLM", "VL-LTR", "LT-DPT", "LIFT", "HLC", "CLIP + linear probe"):
        assert any(line.startswith(f"| {name} | ") and line.count("|") == 6 for line in text.splitlines()), name


# ---- what the original code does, and the kit now does too ----

def parsed_args(module, monkeypatch, tmp_path, dataset, *extra):
    """The arguments a system runs with for `dataset` (its recipe, then the flags), stopped before any data is read."""
    seen = {}

    def stop(args):
        seen.update(vars(args))
        raise KeyboardInterrupt

    monkeypatch.setattr(frame, "load_data", stop)
    with pytest.raises(KeyboardInterrupt):
        module.main(["--dataset", dataset, "--data-root", str(tmp_path), "--features", "x.pt", "--out",
                     str(tmp_path / "out"), "--device", "cpu", *extra])
    common.release_run_locks()
    return seen


def test_each_system_runs_its_recipe_for_the_dataset(monkeypatch, tmp_path):
    from systems import lt_dpt, vl_ltr
    places = parsed_args(lt_dpt, monkeypatch, tmp_path, "places_lt")
    assert (places["epochs"], places["drw_epochs"], places["recipe"]) == (100, 40, "places_lt")  # LT-DPT Sec. 4.1
    assert parsed_args(lt_dpt, monkeypatch, tmp_path, "imagenet_lt")["epochs"] == 70
    assert parsed_args(lt_dpt, monkeypatch, tmp_path, "places_lt", "--epochs", "3")["epochs"] == 3  # a flag wins
    v = parsed_args(vl_ltr, monkeypatch, tmp_path, "places_lt")
    assert (v["lr_lgr"], v["lr_full"], v["alpha"]) == (5e-5, 1e-5, 0.2)  # configs/placeslt
    v = parsed_args(vl_ltr, monkeypatch, tmp_path, "inat2018")
    assert (v["epochs_cvlp"], v["epochs_lgr"], v["alpha"], v["lr_lgr"]) == (100, 360, 0.7, 2e-5)  # configs/inat
    assert parsed_args(vl_ltr, monkeypatch, tmp_path, "imagenet_lt")["lr_lgr"] == 1e-3
    assert parsed_args(lift, monkeypatch, tmp_path, "inat2018")["epochs"] == 20
    toy = parsed_args(ballad, monkeypatch, tmp_path, "toy")
    assert toy["batch_size"] == 32 and toy["recipe"] == "toy" and toy["select"] == "best"
    assert parsed_args(ivlm, monkeypatch, tmp_path, "places_lt")["select"] == "best"
    assert parsed_args(vl_ltr, monkeypatch, tmp_path, "places_lt")["select"] == "last"


def test_vl_ltr_weighs_the_branches_as_its_code():
    image, text = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    p_image, p_text = torch.softmax(image, -1), torch.softmax(text, -1)
    assert torch.allclose(vl_ltr.fuse(image, text, 0.2), 0.2 * p_image + 0.8 * p_text)  # engine.py, not 1 : 1
    assert vl_ltr.fuse(image, text, 0.2).argmax().item() == 1 and vl_ltr.fuse(image, text, 0.7).argmax().item() == 0


def test_ballad_phase_b_epochs_are_the_codes_steps(made_run, tiny_world, tmp_path, capsys):
    n = len((tiny_world / "train.txt").read_text().splitlines())  # 47 images
    ballad.main(["--dataset", "tiny", "--data-root", str(tiny_world), "--features", str(made_run / "text_features.pt"),
                 "--model", f"{tiny_world}/tiny-clip.json", "--pretrained", "none", "--epochs", "2", "--batch-size",
                 "8", "--workers", "0", "--out", str(tmp_path)])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    b = [r for r in log if r["phase"] == "phase_b"]
    assert b[-1]["steps"] == 2 * (n // 8)  # int(N / batch) per epoch (train.py epoch_steps), not max(n_c) x C
    assert b[-1]["lr"] == 0.0  # the cosine steps at each epoch's start: the last epoch trains at lr 0
    text = torch.load(made_run / "text_features.pt", weights_only=True)
    assert f"logit scale {text['logit_scale']:.1f};" in capsys.readouterr().out  # the model's own, not 100


def test_ballad_says_a_one_epoch_phase_trains_nothing(tmp_path, capsys):
    with pytest.raises(FileNotFoundError):  # the warning comes before the data is read
        ballad.main(["--dataset", "toy", "--data-root", str(tmp_path / "nowhere"), "--features", "none.pt",
                     "--epochs-b", "1", "--out", str(tmp_path / "out")])
    said = capsys.readouterr().err
    assert "phase B has 1 epoch" in said and "phase A" not in said  # the toy recipe's phase A has 50


def test_imbalance_vlm_optimizer_as_its_code(tiny_world):
    head = ivlm.SecondStage("disalign", torch.nn.Linear(4, 3))
    groups = ivlm.param_groups(head, 5e-4)
    no_decay = {id(q) for q in groups[0]["params"]}
    named = dict(head.named_parameters())
    assert id(named["confidence.bias"]) in no_decay  # biases: no weight decay
    for name in ("scale", "shift", "confidence.weight"):  # DisAlign's (1, C) scale and shift are decayed, as the code's
        assert id(named[name]) not in no_decay, name
    assert groups[1]["weight_decay"] == 5e-4
    lws, marc = ivlm.SecondStage("lws", torch.nn.Linear(4, 3)), ivlm.SecondStage("marc", torch.nn.Linear(4, 3))
    assert id(lws.scale) in {id(q) for q in ivlm.param_groups(lws, 5e-4)[0]["params"]}  # LWS's (C,) scales are not
    assert {id(marc.a), id(marc.shift)} <= {id(q) for q in ivlm.param_groups(marc, 5e-4)[1]["params"]}
    assert groups[0]["weight_decay"] == 0.0
    assert ivlm.cosine_7_16(0, 100, 10, 0.03) == 0.0 and ivlm.cosine_7_16(10, 100, 10, 0.03) == 0.03
    last = ivlm.cosine_7_16(99, 100, 10, 0.03)
    assert abs(last / 0.03 - math.cos(7 * math.pi / 16 * 89 / 90)) < 1e-12 and last > 0.19 * 0.03  # ends near 0.2 lr


def test_every_lt_dpt_parameter_gets_a_gradient(tiny_world):
    from systems import lt_dpt
    clip, _, _, _ = common.load_clip(f"{tiny_world}/tiny-clip.json", "none")
    model = lt_dpt.DecoupledPrompts(clip.visual, n_fg=2, n_bg=2, groups=3, top_k=2, bg_layers=2)
    assert len(model.alpha) == 1 and len(model.beta) == 1  # 2 layers: the bias acts in the first only
    images = torch.rand(2, 3, 32, 32)
    model(images, torch.rand(2, 16)).pow(2).sum().backward()
    for name, q in model.named_parameters():
        if q.requires_grad:
            assert q.grad is not None and q.grad.abs().sum() > 0, name  # the old last-layer alpha got none


# ---- LIFT ----

def test_adaptformer_and_lora_start_as_the_plain_block(tiny_world):
    clip, _, _, _ = common.load_clip(f"{tiny_world}/tiny-clip.json", "none")
    block = clip.visual.transformer.resblocks[0]
    x = torch.randn(2, 17, 64)
    plain = block(x)
    adapter = lift.AdaptFormer(64, 4)  # up-projection zero: nothing added
    assert torch.allclose(lift.tuned_block(block, x, adapter=adapter), plain, atol=1e-6)
    lora = torch.nn.ModuleDict({"q": lift.LoRA(64, 4), "v": lift.LoRA(64, 4)})  # B zero: the same attention
    assert torch.allclose(lift.tuned_block(block, x, lora=lora), plain, atol=1e-5)
    with torch.no_grad():
        adapter.up.weight.fill_(0.01)
    assert not torch.allclose(lift.tuned_block(block, x, adapter=adapter), plain, atol=1e-4)
    assert lift.adapter_width(1000, 12) == 32 and lift.adapter_width(365, 12) == 8 and lift.adapter_width(100, 12) == 4


def test_lift_starts_from_the_class_prompts_and_adjusts_its_loss(tiny_world):
    clip, _, _, _ = common.load_clip(f"{tiny_world}/tiny-clip.json", "none")
    prompts = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    model = lift.Lift(clip.visual, "adaptformer", 4, 10, prompts, 25.0).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():  # zero-initialised adapters and the text head: CLIP's own zero-shot logits, scaled by 25
        expected = 25 * torch.nn.functional.normalize(clip.visual(images), dim=-1) @ prompts.T
        assert torch.allclose(model(images), expected, atol=1e-5)
    trained = {id(q) for q in model.trained()}
    assert id(model.head) in trained and not any(id(q) in trained for q in clip.visual.parameters())
    z, log_prior = torch.tensor([[1.0, 2.0]]), torch.log(torch.tensor([0.9, 0.1]))
    s0, s1 = 1 + math.log(0.9), 2 + math.log(0.1)  # z + log(pi): the head's logit is raised, the tail's lowered
    expected = -(s0 - math.log(math.exp(s0) + math.exp(s1)))
    assert abs(lift.logit_adjusted_loss(z, torch.tensor([0]), log_prior).item() - expected) < 1e-6


def test_tte_takes_the_five_crops_of_the_enlarged_image():
    from PIL import Image
    from torchvision import transforms as T
    image = Image.fromarray(np.arange(40 * 40 * 3, dtype=np.uint8).reshape(40, 40, 3) % 251)
    identity = T.Normalize([0, 0, 0], [1, 1, 1])
    crops = [lift.FiveCropPick(32, 3, k, identity)(image) for k in range(5)]
    big = np.asarray(image.resize((35, 35), Image.BILINEAR), dtype=np.float32) / 255  # resized to 32 + 3
    corners = [big[:32, :32], big[:32, 3:], big[3:, :32], big[3:, 3:]]  # torchvision: tl, tr, bl, br, centre
    for crop, corner in zip(crops, corners):
        assert crop.shape == (3, 32, 32) and np.abs(crop.permute(1, 2, 0).numpy() - corner).max() < 0.02
    assert len({c.sum().item() for c in crops}) == 5  # five different crops
