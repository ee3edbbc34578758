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
from systems import ballad, imbalance_vlm as ivlm


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
    batches = ballad.common.class_aware_batches(labels, 3, 4, 5, torch.Generator().manual_seed(0))
    drawn = torch.cat(batches)
    assert len(drawn) == 30  # max n_c x C
    per_class = torch.bincount(labels[drawn], minlength=3).tolist()
    assert all(8 <= n <= 12 for n in per_class), per_class  # every class about equally often (4 per visit)
    visits = labels[drawn].view(-1, 2)  # runs of 4 from one class: any aligned pair comes from one class
    assert (visits[:, 0] == visits[:, 1]).all()
    ones = [i for i in drawn.tolist() if labels[i] == 1]  # class 1 has images 10, 11, 12
    for k in range(0, len(ones) - 2, 3):  # each image of a class once before any repeats
        assert sorted(ones[k:k + 3]) == [10, 11, 12], ones


def test_weighted_sampler_balances_classes():
    labels = torch.tensor([0] * 90 + [1] * 10)
    drawn = torch.cat(common.weighted_batches(labels, [1 / 90, 1 / 10], 100, 10000, torch.Generator().manual_seed(0)))
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
    for name in ("ballad", "imbalance_vlm"):
        out = subprocess.run(["make", "-C", str(ROOT), "system", f"NAME={name}"] + system_args(tiny_world, made_run),
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return made_run


@pytest.mark.parametrize("name, variants", [("ballad", ["ballad_phase_a", "ballad"]),
                                            ("imbalance_vlm", ["ivlm_ce", "ivlm_ce_disalign", "ivlm_ce_marc"])])
def test_system_results_recompute_from_predictions(systems_run, name, variants):
    folder = systems_run / "systems" / name
    results = json.loads((folder / "results.json").read_text())
    assert list(results["variants"]) == variants and results["shot_rule"] == "lift"
    assert results["meta"]["args"]["epochs"] == 2 and results["meta"]["dataset"] == "tiny"
    z = np.load(folder / "predictions.npz")
    counts = torch.load(systems_run / "coarse.pt", weights_only=True)["class_counts"].numpy()
    for variant in variants:
        assert results["variants"][variant] == recompute(z[f"pred_{variant}"], z["labels"], counts), variant
    assert (folder / "log.jsonl").exists() and (folder / "results.md").exists()


def test_system_resume_repeats_the_uninterrupted_run(made_run, tiny_world, tmp_path, monkeypatch):
    args = ["--dataset", "tiny", "--data-root", str(tiny_world), "--features", str(made_run / "text_features.pt"),
            "--model", f"{tiny_world}/tiny-clip.json", "--pretrained", "none", "--epochs", "2", "--batch-size", "8",
            "--workers", "0"]
    ballad.main(args + ["--out", str(tmp_path / "full")])
    real = common.PhaseCheckpoints.epoch_done

    def killed_in_phase_b(self, phase, epoch, *a, **k):
        real(self, phase, epoch, *a, **k)
        if phase == "phase_b" and epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(common.PhaseCheckpoints, "epoch_done", killed_in_phase_b)
    with pytest.raises(KeyboardInterrupt):
        ballad.main(args + ["--out", str(tmp_path / "killed")])
    monkeypatch.setattr(common.PhaseCheckpoints, "epoch_done", real)
    assert (tmp_path / "killed" / "phase_a.pt").exists() and not (tmp_path / "killed" / "phase_b.pt").exists()
    with pytest.raises(SystemExit, match="--lr-b: 0.2 in .*last.pt, 0.1 now"):
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
                "Imbalance-VLM: cross-entropy + DisAlign, two stages", "HLC"):
        assert f"| {row} |" in text, row
    assert "paper Many" not in text  # the tiny world has no published numbers
