"""End to end through make on the tiny world, resume, and stage 03's input checks."""
import argparse
import json
import subprocess

import numpy as np
import pytest
import torch

import basics
import common
import make_tables
from conftest import ROOT, load_stage, make_args, train_args

GROUP_NAMES = ("many", "medium", "few")


def recompute(pred, labels, counts):
    """Independent of common.accuracy_report: loops over classes."""
    groups = np.where(counts > 100, 0, np.where(counts >= 20, 1, 2))
    per_class = {c: np.mean(pred[labels == c] == c) for c in np.unique(labels)}
    out = {"overall": 100 * np.mean(pred == labels)}
    for g, name in enumerate(GROUP_NAMES):
        accs = [a for c, a in per_class.items() if groups[c] == g]
        out[name] = 100 * np.mean(accs) if accs else None
    return out


def close(report, expected):
    return all((report[k] is None and expected[k] is None) or abs(report[k] - expected[k]) < 0.006
               for k in expected)


def test_make_all_writes_every_output(made_run):
    for name in ("corpus.json", "text_features.pt", "coarse.pt", "log.jsonl", "results.json",
                 "results.md", "predictions.npz", "explanations.html", "report.html"):
        assert (made_run / name).exists(), name
    assert not (made_run / "last.pt").exists()  # only an interrupted training leaves one
    results = json.loads((made_run / "results.json").read_text())
    assert list(results["variants"]) == ["zero_shot", "descriptors_zero_shot", "coarse", "coarse_la",
                                         "hlc_unweighted", "hlc"]
    assert list(results["topk_sweep"]) == ["1", "3", "5", "7", "9", "11", "all"]
    assert results["topk_sweep"]["1"] == results["variants"]["coarse_la"]
    assert results["k"] == 5 and results["tau"] == 1.0 and results["shot_rule"] == "lift"
    for key in ("dataset", "shot_counts", "meta"):
        assert key in results
    meta = results["meta"]
    assert meta["num_classes"] == 5 and meta["model"] == "tiny-clip" and "torch" in meta["versions"]
    trained = torch.load(made_run / "coarse.pt", weights_only=True)["meta"]
    text = torch.load(made_run / "text_features.pt", weights_only=True)["meta"]
    assert meta["precision"] == trained["precision"] == text["precision"] == "fp32"  # auto, as run: on a CPU


def recompute_all(z, k_sweep=(1, 3, 5, 7, 9, 11, "all")):
    """Every prediction from predictions.npz in float64 numpy, independently of the kit: stable sorts and loops."""
    f = lambda name: z[name].astype(np.float64)
    w = f("w_cls") / np.linalg.norm(f("w_cls"), axis=1, keepdims=True)
    logits = float(z["scale"]) * f("hlc_features") @ w.T
    log_prior = np.log(z["class_prior"])
    scores, scores_plain = f("hlc_features") @ f("desc_proto").T, f("hlc_features") @ f("desc_proto_unweighted").T

    def rerank(adjusted, s, k):
        out = []
        for a, row in zip(adjusted, s):
            cand = sorted(range(len(a)), key=lambda c: -a[c])[:k]  # sorted() is stable
            out.append(max(cand, key=lambda c: row[c]))  # max() keeps the first best
        return np.array(out)

    tau, k = float(z["tau"]), int(z["k"])
    adjusted = logits - tau * log_prior
    preds = {"zero_shot": (f("plain_features") @ f("classname_features").T).argmax(1),
             "descriptors_zero_shot": (f("plain_features") @ f("desc_proto_unweighted").T).argmax(1),
             "coarse": logits.argmax(1), "coarse_la": adjusted.argmax(1),
             "hlc_unweighted": rerank(adjusted, scores_plain, k), "hlc": rerank(adjusted, scores, k)}
    for kk in k_sweep:
        preds[f"k{kk}"] = rerank(adjusted, scores, logits.shape[1] if kk == "all" else kk)
    for t in (0, 0.5, 1, 1.5, 2):
        adj = logits - t * log_prior
        preds[f"tau{t:g}_coarse_la"], preds[f"tau{t:g}_hlc"] = adj.argmax(1), rerank(adj, scores, k)
    return preds


def test_every_number_recomputes_from_predictions(made_run):
    results = json.loads((made_run / "results.json").read_text())
    z = np.load(made_run / "predictions.npz")
    n, d = len(z["labels"]), z["hlc_features"].shape[1]
    for key in ("hlc_features", "plain_features"):  # what the scores are made of, in full precision
        assert z[key].dtype == np.float32 and z[key].shape == (n, d)
        assert np.allclose(np.linalg.norm(z[key], axis=1), 1, atol=1e-5)
    for key in ("w_cls", "desc_proto", "desc_proto_unweighted", "classname_features"):
        assert z[key].dtype == np.float32 and z[key].shape == (5, d)
    assert z["class_prior"].dtype == np.float64 and int(z["k"]) == results["k"] and float(z["tau"]) == results["tau"]
    assert not any(name.endswith(("_logits", "_scores")) for name in z.files)  # no N x C score arrays
    labels = z["labels"]
    counts = z["class_counts"]  # the file alone recomputes the groups: counts and rule are in it
    assert counts.dtype == np.int64 and str(z["shot_rule"]) == "lift" and np.array_equal(z["group_counts"], counts)
    assert np.array_equal(counts, torch.load(made_run / "coarse.pt", weights_only=True)["class_counts"].numpy())
    assert np.allclose(z["class_prior"], np.maximum(counts, 1) / np.maximum(counts, 1).sum())
    for name, pred in recompute_all(z).items():
        assert np.array_equal(pred, z[f"pred_{name}"]), name
        if name in results["variants"]:
            assert close(results["variants"][name], recompute(pred, labels, counts)), name
        elif name.startswith("k"):
            assert close(results["topk_sweep"][name[1:]], recompute(pred, labels, counts)), name
        else:
            tau, variant = name[3:].split("_", 1)
            assert close(results["tau_sweep"][tau][variant], recompute(pred, labels, counts)), name
    assert results["shot_counts"] == {"many": 0, "medium": 1, "few": 4}


def test_make_is_incremental(made_run, tiny_world):
    out = subprocess.run(["make", "-C", str(ROOT), "-n", "all"] + make_args(tiny_world, made_run),
                         capture_output=True, text=True)
    assert "03_train_coarse.py" not in out.stdout and "01_build_corpus.py" not in out.stdout
    out = subprocess.run(["make", "-C", str(ROOT), "-n", "all"] + make_args(tiny_world, made_run, epochs=3),
                         capture_output=True, text=True)
    assert "03_train_coarse.py" in out.stdout and "02_cache_descriptors.py" not in out.stdout


def test_resume_matches_uninterrupted_run(made_run, tiny_world, tmp_path, monkeypatch):
    stage = load_stage("03_train_coarse.py")
    features = made_run / "text_features.pt"
    stage.main(train_args(tiny_world, features, tmp_path / "full" / "coarse.pt", "--epochs", "3"))

    original = common.Checkpoint.save

    def save_then_die(self, state):
        original(self, state)
        raise KeyboardInterrupt  # as if the run were killed right after epoch 1's checkpoint

    monkeypatch.setattr(common.Checkpoint, "save", save_then_die)
    broken = tmp_path / "broken" / "coarse.pt"
    with pytest.raises(KeyboardInterrupt):
        stage.main(train_args(tiny_world, features, broken, "--epochs", "3"))
    assert not broken.exists() and (broken.parent / "last.pt").exists()
    monkeypatch.setattr(common.Checkpoint, "save", original)
    common.release_run_locks()
    with pytest.raises(SystemExit, match=r"epoch 1 of 3 in .*last.pt: an interrupted training is there. RESUME=1 "
                                         r"continues it \(--resume\), FRESH=1 starts over"):
        stage.main(train_args(tiny_world, features, broken, "--epochs", "3"))  # never thrown away without a word
    with pytest.raises(SystemExit, match="--epochs: 3 in .*last.pt, 4 now(.|\n)*schedule was set for epochs 3"):
        stage.main(train_args(tiny_world, features, broken, "--epochs", "4", "--resume"))  # not another schedule
    saved = torch.load(broken.parent / "last.pt", weights_only=True)["meta"]["args"]
    switched = argparse.Namespace(**{**saved, "grad_checkpointing": True, "decode": "tensor", "workers": 3})
    common.check_resume_args(saved, switched, "last.pt")  # a memory or speed switch after an OOM does not refuse
    stage.main(train_args(tiny_world, features, broken, "--epochs", "3", "--resume"))
    assert not (broken.parent / "last.pt").exists()

    a = torch.load(tmp_path / "full" / "coarse.pt", weights_only=True)
    b = torch.load(broken, weights_only=True)
    for key in ("prompts", "w_cls", "w_llm", "class_counts"):
        assert torch.equal(a[key], b[key]), key
    assert len((broken.parent / "log.jsonl").read_text().splitlines()) == 3


def test_a_gpu_out_of_memory_is_one_line_saying_what_needs_less_and_what_is_kept(made_run, tiny_world, tmp_path,
                                                                                 monkeypatch, capsys):
    stage = load_stage("03_train_coarse.py")
    original = common.Checkpoint.save

    def save_then_run_out(self, state):
        original(self, state)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                     "15.57 GiB of which 1.02 GiB is free.")
    monkeypatch.setattr(common.Checkpoint, "save", save_then_run_out)
    out = tmp_path / "oom" / "coarse.pt"
    args = train_args(tiny_world, made_run / "text_features.pt", out, "--epochs", "3")
    with pytest.raises(SystemExit) as e:
        basics.run_script(lambda: stage.main(args))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "Traceback" not in err
    assert "error: the GPU ran out of memory (CUDA out of memory): TRAIN_ARGS=\"--grad-checkpointing\"" in err, err
    assert f"{out.parent / 'last.pt'} holds epoch 1 of 3: RESUME=1 continues it" in err


def test_stage03_refuses_features_of_another_model(made_run, tiny_world, tmp_path):
    stage = load_stage("03_train_coarse.py")
    text = torch.load(made_run / "text_features.pt", weights_only=True)
    text["meta"]["model"] = "ViT-B-16-quickgelu"
    torch.save(text, tmp_path / "other_model.pt")
    with pytest.raises(SystemExit, match="model: file has 'ViT-B-16-quickgelu', this run needs 'tiny-clip'"):
        stage.main(train_args(tiny_world, tmp_path / "other_model.pt", tmp_path / "c.pt", "--epochs", "1"))
    text = torch.load(made_run / "text_features.pt", weights_only=True)
    text["meta"]["num_classes"] = 7
    torch.save(text, tmp_path / "other_classes.pt")
    with pytest.raises(SystemExit, match="num_classes: file has 7, this run needs 5"):
        stage.main(train_args(tiny_world, tmp_path / "other_classes.pt", tmp_path / "c.pt", "--epochs", "1"))


def test_a_text_features_file_whose_entries_break_the_contract_is_refused_naming_the_entry(made_run, tiny_world,
                                                                                          tmp_path):
    """Before, a stage-02 file written by another program or edited by hand reached the training: a missing desc_mask
    was a bare KeyError, descriptors of another width 'mat1 and mat2 shapes cannot be multiplied', and float16 corpus
    features trained without a word, in half precision."""
    stage = load_stage("03_train_coarse.py")
    good = torch.load(made_run / "text_features.pt", weights_only=True)
    cases = {"no desc_mask": ({"desc_mask": None}, r"no desc_mask; stage 02's file holds corpus, corpus_norm"),
             "narrow": ({"descriptors": good["descriptors"][..., :16]},
                        r"descriptors has shape \(5, \d+, 16\), 16 along d, where its meta's embed_dim is \d+"),
             "fewer classes": ({"classname": good["classname"][:4]},
                               r"classname has shape \(4, \d+\), 4 along C, where its meta's num_classes is 5"),
             "half": ({"corpus": good["corpus"].half()},
                      r"corpus is a torch.float16 tensor of shape .* stage 02 writes a torch.float32 tensor of shape "
                      r"\(N, d\)"),
             "labels": ({"corpus_labels": good["corpus_labels"] + 1},
                        r"corpus_labels run from 1 to 5, outside \[0, 5\)"),
             "mask of other M": ({"desc_mask": good["desc_mask"][:, :2]},
                                 r"desc_mask has shape \(5, 2\), 2 along M, where descriptors has \d+: its entries"),
             "empty mask": ({"desc_mask": good["desc_mask"].clone().index_fill_(0, torch.tensor([3]), False)},
                            r"desc_mask marks no descriptor for class\(es\) \[3\]"),
             "texts": ({"descriptor_texts": good["descriptor_texts"][:3]}, r"descriptor_texts lists 3 classes, the "
                                                                          r"tensors 5")}
    for name, (change, said) in cases.items():
        text = {**good, **change}
        text = {k: v for k, v in text.items() if v is not None}
        path = tmp_path / f"{name}.pt"
        torch.save(text, path)
        with pytest.raises(ValueError, match=f"{path}: {said}"):
            stage.main(train_args(tiny_world, path, tmp_path / "c.pt", "--epochs", "1"))
    torch.save([good["corpus"]], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt: holds a list, not stage 02's dict of tensors"):
        stage.main(train_args(tiny_world, tmp_path / "list.pt", tmp_path / "c.pt", "--epochs", "1"))
    assert not (tmp_path / "c.pt").exists()
    common.check_text_features(good, made_run / "text_features.pt")  # stage 02's own file passes


def test_a_coarse_file_whose_entries_break_the_contract_is_refused_naming_the_entry(made_run, tiny_world, tmp_path):
    """Before, stage 04 on a coarse.pt from one's own stage 03 (or edited by hand) stopped on a bare KeyError: 'w_llm',
    or 'The size of tensor a (10) must match the size of tensor b (5)'; a float16 classifier evaluated without a
    word."""
    stage = load_stage("04_eval_hlc.py")
    good = torch.load(made_run / "coarse.pt", weights_only=True)
    tokens, depth = good["prompt_tokens"], good["prompt_depth"]
    cases = {"no w_llm": ({"w_llm": None}, r"no w_llm; stage 03's file holds prompts, w_cls, w_llm"),
             "other M": ({"w_llm": good["w_llm"][:, :2]},
                         r"w_llm has shape \(5, 2\), 2 along M, where the text features' M is \d+: its entries"),
             "half": ({"w_cls": good["w_cls"].half()}, r"w_cls is a torch.float16 tensor"),
             "counts": ({"class_counts": good["class_counts"][:4]},
                        r"class_counts has shape \(4,\), 4 along C, where the text features' C is 5"),
             "prompts": ({"prompts": good["prompts"][:, :1]},
                         rf"prompts has shape \({depth}, 1, \d+\), 1 along prompt_tokens, where its prompt_tokens is "
                         rf"{tokens}"),
             "meta": ({"meta": "stage 03"}, r"its meta is a str, not stage 03's dict")}
    out = tmp_path / "r" / "results.json"
    for name, (change, said) in cases.items():
        coarse = {k: v for k, v in {**good, **change}.items() if v is not None}
        path = tmp_path / f"{name}.pt"
        torch.save(coarse, path)
        args = ["--dataset", "tiny", "--data-root", str(tiny_world), "--features", str(made_run / "text_features.pt"),
                "--coarse", str(path), "--out", str(out), "--model", f"{tiny_world}/tiny-clip.json", "--pretrained",
                "none", "--workers", "0", "--explain", "0"]
        with pytest.raises(ValueError, match=f"{path}: {said}"):
            stage.main(args)
    assert not out.exists()


def test_text_encoder_runs_only_in_stage_02(made_run, tiny_world, tmp_path, monkeypatch, capsys):
    import open_clip
    calls = []
    real_autocast = common.image_autocast

    def recording_autocast(device, precision="auto"):
        calls.append(torch.device(device).type)
        return real_autocast(device, precision)

    def no_text(*a, **k):
        raise AssertionError("the text encoder ran outside stage 02")

    monkeypatch.setattr(open_clip.model.CLIP, "encode_text", no_text)
    monkeypatch.setattr(common, "image_autocast", recording_autocast)
    train = load_stage("03_train_coarse.py")
    train.main(train_args(tiny_world, made_run / "text_features.pt", tmp_path / "coarse.pt", "--epochs", "1"))
    assert "note: prompts in the first" not in capsys.readouterr().out  # 12 cover the tiny CLIP's 2 layers
    evaluate = load_stage("04_eval_hlc.py")
    evaluate.main(["--dataset", "tiny", "--data-root", str(tiny_world), "--features", str(made_run / "text_features.pt"),
                   "--coarse", str(tmp_path / "coarse.pt"), "--out", str(tmp_path / "results.json"), "--model",
                   f"{tiny_world}/tiny-clip.json", "--pretrained", "none", "--workers", "0", "--explain", "0"])
    assert calls and set(calls) == {"cpu"}  # every image-tower pass went through image_autocast


def test_a_k_that_covers_every_class_is_said_to_leave_the_descriptors_alone(made_run, tiny_world, tmp_path,
                                                                         capsys):
    """With as many candidates as classes (K = 5 on a 5-class dataset of one's own) HLC is the descriptors' zero-shot
    over every class; before, nothing said so, and HLC under the classifier with LA looked like a fault."""
    evaluate = load_stage("04_eval_hlc.py")
    for k, said in ((5, True), (3, False)):
        evaluate.main(["--dataset", "tiny", "--data-root", str(tiny_world), "--features",
                       str(made_run / "text_features.pt"), "--coarse", str(made_run / "coarse.pt"), "--out",
                       str(tmp_path / f"k{k}" / "results.json"), "--model", f"{tiny_world}/tiny-clip.json",
                       "--pretrained", "none", "--workers", "0", "--explain", "0", "--k", str(k)])
        out = capsys.readouterr().out
        assert ("note: K = 5 candidates cover all 5 classes, so HLC chooses among every class by the descriptors "
                "alone" in out) is said, out
    hlc, every = (json.loads((tmp_path / "k5" / "results.json").read_text())[key] for key in ("variants", "topk_sweep"))
    assert hlc["hlc"] == every["all"]


@pytest.mark.parametrize("copy_rows", [None, 1])
def test_stage02_encodes_each_distinct_sentence_once(tiny_world, copy_rows, monkeypatch):
    """Repeats, and sentences an earlier call encoded (the templates and descriptors stage 01 puts in the corpus),
    are copied from where they were first encoded; the truncation flags follow the copies, in slices of any size."""
    import open_clip
    stage = load_stage("02_cache_descriptors.py")
    if copy_rows:
        monkeypatch.setattr(stage, "COPY_ROWS", copy_rows)
    model, _, _, name = common.load_clip(str(tiny_world / "tiny-clip.json"), "none", "cpu")
    tokenizer, seen = open_clip.get_tokenizer(name), []
    encode = model.encode_text
    model.encode_text = lambda tokens: seen.append(len(tokens)) or encode(tokens)
    long = " ".join(["red"] * 40)  # the tiny CLIP holds 30 tokens
    corpus = ["a red square", long, "a red square", "a blue square"]
    feats, norms, cut, rows = stage.encode_texts(model, tokenizer, corpus, "cpu", 2)
    assert seen == [2, 1] and rows == {"a red square": 0, long: 1, "a blue square": 3}
    later = ["a blue square", "a green square", long, "a green square"]
    again, again_norms, again_cut, _ = stage.encode_texts(model, tokenizer, later, "cpu", 2,
                                                          known=(rows, (feats, norms, cut)))
    assert seen == [2, 1, 1]  # only the green square is new
    assert cut.tolist() == [False, True, False, False] and again_cut.tolist() == [False, False, True, False]
    assert torch.equal(again[[0, 2]], feats[[3, 1]]) and torch.equal(again_norms[[0, 2]], norms[[3, 1]])
    assert torch.equal(feats[2], feats[0]) and torch.equal(again[3], again[1])
    alone = torch.cat([stage.encode_texts(model, tokenizer, [t], "cpu", 1)[0] for t in corpus + later])
    assert torch.allclose(torch.cat([feats, again]), alone, atol=1e-6)  # a batch of one rounds a little differently


def test_prompts_in_fewer_layers_than_the_tower_has_are_noted(made_run, tiny_world, tmp_path, capsys):
    """The paper's 12 layers are all of ViT-B/16's; on ViT-L/14 (24) they would be half, which stage 03 says."""
    load_stage("03_train_coarse.py").main(train_args(tiny_world, made_run / "text_features.pt", tmp_path / "c.pt",
                                                     "--epochs", "1", "--prompt-depth", "1"))
    assert "note: prompts in the first 1 of the image tower's 2 layers (--prompt-depth 2 puts them in every layer" \
        in capsys.readouterr().out
    assert torch.load(tmp_path / "c.pt", weights_only=True)["prompts"].shape[0] == 1


def test_precision_switch_decides_the_arithmetic():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with common.image_autocast("cpu"):  # auto: bf16 is for CUDA only
        assert (a @ b).dtype == torch.float32
    with common.image_autocast("cpu", "bf16"):  # asked for: the CPU measurement of what bf16 changes
        assert (a @ b).dtype == torch.bfloat16
    with common.image_autocast("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32


def test_auto_precision_is_bf16_only_on_gpus_with_bf16_arithmetic(monkeypatch):
    """A T4 or RTX 20xx (compute capability 7.5) has no bf16 arithmetic: torch would emulate it, no faster than
    float32 and less precise, so auto keeps those in float32."""
    for capability, expected in (((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert common.effective_precision("cuda") == expected and common.effective_precision("cuda:1") == expected
        assert [common.effective_precision("cuda", p) for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    assert common.effective_precision("cpu") == "fp32" and common.effective_precision("cpu", "bf16") == "bf16"


def test_a_loaded_clip_leaves_float32_convolutions_float32_on_a_gpu(tiny_world, monkeypatch):
    """cuDNN convolutions are TF32 by default on Ampere and later GPUs, so --precision fp32 would not be float32 in a
    ViT's patch embedding or anywhere in a ResNet tower. A CPU cannot show the arithmetic; the switch is checked."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default, put back after the test
    common.load_clip(f"{tiny_world}/tiny-clip.json", "none")
    assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False


# ---- the paper's tables and the explanations page ----

@pytest.fixture(scope="module")
def tables_run(made_run, tiny_world):  # six more trainings through make, 2 min on 2 cores: its tests are slow
    out = subprocess.run(["make", "-C", str(ROOT), "tables"] + make_args(tiny_world, made_run),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Table 4" in out.stdout and "Table 6" in out.stdout and "Table 7" in out.stdout
    again = subprocess.run(["make", "-C", str(ROOT), "-n", "tables"] + make_args(tiny_world, made_run),
                           capture_output=True, text=True)
    assert "03_train" not in again.stdout and "04_eval" not in again.stdout, again.stdout  # each row recorded its params
    return made_run


def table_rows(path):
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 5 and cells[0] and cells[0] not in ("", "---") and cells[1] != "Many":
            rows[cells[0]] = cells[1:5]
    return rows


@pytest.mark.slow
def test_table4_rows_come_from_separate_trainings(tables_run):
    rows = table_rows(tables_run / "tables" / "table4.md")
    assert len(rows) == 9 and all(r[3] != "-" for r in rows.values())
    switches = {}
    for name in ("lp", "vpt", "corpus", "sfm", "desc_ce", "na"):
        ckpt = torch.load(tables_run / "ablation" / name / "coarse.pt", weights_only=True)
        switches[name] = ckpt["meta"]["args"]
        assert switches[name]["cls_loss_weight"] == (0 if name == "na" else 1)
        if name == "lp":  # the linear probe trained no prompts
            assert ckpt["prompts"].numel() == 0 and switches[name]["prompt_tokens"] == 0
        if name in ("desc_ce", "na"):  # plain cross-entropy descriptor loss, the weights learned
            assert switches[name]["desc_loss_la"] == 0 and torch.count_nonzero(ckpt["w_llm"]) > 0
        else:  # no descriptor loss: the weights stayed uniform
            assert torch.count_nonzero(ckpt["w_llm"]) == 0 and switches[name]["desc_loss_weight"] == 0
    assert switches["vpt"]["prompt_tokens"] == 20 and switches["vpt"]["corpus_ratio"] == 0
    assert switches["corpus"]["corpus_ratio"] == 1 and switches["corpus"]["mixup_alpha"] == 0
    assert switches["sfm"]["mixup_alpha"] > 0
    assert switches["na"]["corpus_ratio"] == 0 and switches["na"]["mixup_alpha"] == 0
    full = torch.load(tables_run / "coarse.pt", weights_only=True)
    assert torch.count_nonzero(full["w_llm"]) > 0  # the full model learned its weights
    sfm = json.loads((tables_run / "ablation" / "sfm" / "results.json").read_text())
    assert rows["h) + descriptors, unweighted"][3] == f"{sfm['variants']['hlc_unweighted']['overall']:.2f}"
    ce = json.loads((tables_run / "ablation" / "desc_ce" / "results.json").read_text())
    assert rows["i') the same, plain cross-entropy descriptor loss"][3] == f"{ce['variants']['hlc']['overall']:.2f}"


@pytest.mark.slow
def test_table6_k1_is_coarse_la_and_all_is_reranking_everything(tables_run):
    rows = table_rows(tables_run / "tables" / "table6.md")
    results = json.loads((tables_run / "results.json").read_text())
    for tau in ("0", "0.5", "1", "1.5", "2"):  # the tau sweep, below the K sweep
        hlc = results["tau_sweep"][tau]["hlc"]["overall"]
        assert rows[f"tau = {tau}, hlc"][3] == f"{hlc:.2f}"
    assert results["tau_sweep"]["1"]["hlc"] == results["variants"]["hlc"]
    la = results["variants"]["coarse_la"]
    assert rows["1"] == [f"{la[g]:.2f}" if la[g] is not None else "-" for g in ("many", "medium", "few", "overall")]
    z = np.load(tables_run / "predictions.npz")
    everything = (z["hlc_features"].astype(np.float64) @ z["desc_proto"].astype(np.float64).T).argmax(1)
    assert abs(float(rows["all (no classifier)"][3]) - 100 * np.mean(everything == z["labels"])) < 0.006
    na = json.loads((tables_run / "ablation" / "na" / "results.json").read_text())  # its own training's "all"
    na = na["topk_sweep"]["all"]
    assert rows[make_tables.NA_ROW] == [f"{na[g]:.2f}" if na[g] is not None else "-"
                                        for g in ("many", "medium", "few", "overall")]


@pytest.mark.slow
def test_relations_read_the_tables_rows(tables_run):
    rows = {r[0]: r for r in ([c.strip() for c in line.strip("|").split(" | ")] for line in
                              make_tables.relations_table([tables_run] * 3).splitlines()[2:])}
    table4 = {label: float(r[3]) for label, r in table_rows(tables_run / "tables" / "table4.md").items()}
    vpt = table4["d) + VPT"] - table4["b) linear probe"]
    assert rows["b -> d: + VPT"][2] == ", ".join([f"{vpt:+.2f}"] * 3)
    weights = table4["i) + reweighted (HLC)"] - table4["h) + descriptors, unweighted"]
    assert rows["h -> i: learned weights"][3] == f"{weights:+.2f}"
    others = max(v for k, v in table4.items() if not k.startswith("i) "))
    assert rows["HLC over the best other row of Table 4"][3] == f"{table4['i) + reweighted (HLC)'] - others:+.2f}"
    assert not any(k.startswith("uniform minus") for k in rows)  # the tiny world has no descriptor kinds


@pytest.mark.slow
def test_table7_rows(tables_run):
    rows = table_rows(tables_run / "tables" / "table7.md")
    results = json.loads((tables_run / "results.json").read_text())
    assert rows["CLIP (class-name prompts)"][3] == f"{results['variants']['zero_shot']['overall']:.2f}"
    assert rows["descriptors, reweighted (HLC)"][3] == f"{results['zero_shot_reweighted']['overall']:.2f}"


class Page:
    """What a test needs from explanations.html, read with the standard library's HTML parser."""

    def __init__(self, text):
        from html.parser import HTMLParser
        self.sections, self.images = [], []
        page = self

        class Parser(HTMLParser):
            def handle_starttag(self, tag, attrs):
                a = dict(attrs)
                if tag == "section":
                    page.sections.append(dict(index=int(a["data-index"]), pred=int(a["data-pred"]),
                                              label=int(a["data-label"]), cands=[], chosen=None))
                elif tag == "div" and "data-class" in a:
                    page.sections[-1]["cands"].append(int(a["data-class"]))
                    if "chosen" in a.get("class", ""):
                        page.sections[-1]["chosen"] = int(a["data-class"])
                elif tag == "img":
                    page.images.append(a["src"])

        Parser().feed(text)


def test_explanations_match_predictions(made_run):
    import base64
    import io
    from PIL import Image
    page = Page((made_run / "explanations.html").read_text())
    z = np.load(made_run / "predictions.npz")
    assert len(page.sections) == 6 and len(page.images) == 6
    for src in page.images:
        assert src.startswith("data:image/jpeg;base64,")  # inlined: the page needs no other file
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    w = z["w_cls"].astype(np.float64) / np.linalg.norm(z["w_cls"].astype(np.float64), axis=1, keepdims=True)
    adjusted = float(z["scale"]) * z["hlc_features"].astype(np.float64) @ w.T - np.log(z["class_prior"])
    for s in page.sections:
        i = s["index"]
        assert s["pred"] == z["pred_hlc"][i] and s["label"] == z["labels"][i] and s["chosen"] == s["pred"]
        assert s["cands"] == list(np.argsort(-adjusted[i], kind="stable")[:5])


def test_explanations_render_in_headless_chromium(made_run, tmp_path):
    import shutil
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if not chromium:  # .ci/run installs Debian's chromium, so CI always renders the page
        pytest.skip("no Chromium on this machine: the explanations page was not rendered (apt-get install chromium)")
    png = tmp_path / "explanations.png"
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1000,1400",
                          f"file://{made_run / 'explanations.html'}"], capture_output=True, text=True, timeout=120)
    assert png.exists(), out.stderr[-2000:]
    from PIL import Image
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    assert pixels.shape[0] > 500 and pixels.std() > 10  # a page with text and images, not a blank one


def test_relations_say_which_seed_or_the_mean_fails(monkeypatch):
    tables = load_stage("make_tables.py")
    base = dict(lp=60.0, lp_la=70.0, vpt=64.0, vpt_la=72.0, corpus=73.0, sfm=74.0, plain=71.0, hlc=75.0,
                best_other=74.0, k1=74.0, k5=75.0, all=74.5, na=65.0, zero_shot=50.0, vcd=60.0, reweighted=65.0,
                below_nonvisual=3.0, below_wrong=2.0)
    seeds = [dict(base), dict(base, corpus=71.0, k5=73.5, below_nonvisual=1.5),
             dict(base, corpus=72.5, below_wrong=-0.5)]
    monkeypatch.setattr(tables, "relation_values", lambda run: seeds[int(run)])
    rows = {line.split(" | ")[0].lstrip("| "): line for line in tables.relations_table(["0", "1", "2"]).splitlines()}
    assert rows["b -> d: + VPT"].endswith("| +4.00, +4.00, +4.00 | +4.00 | > 0 on the mean | yes |")
    assert "| +1.00, -1.00, +0.50 | +0.17 |" in rows["e -> f: + corpus"] and rows["e -> f: + corpus"].endswith("| yes |")
    assert rows["K = 5 over K = 1"].endswith("| +1.00, -0.50, +1.00 | +0.50 | >= 0 every seed | no: seed 1 |")
    assert rows["HLC over the linear probe with LA"].endswith("| +5.00 | >= 2 on the mean | yes |")
    assert rows['HLC over the full model\'s descriptors alone ("all")'].endswith("| no: mean |")
    assert rows["uniform minus the wrong descriptors' weight (x 100)"].endswith("| >= 2 every seed | no: seed 2 |")
    assert rows["uniform minus the non-visual descriptors' weight (x 100)"].endswith("| no: seed 1 |")  # under, not well
    seeds[0] = {k: v for k, v in base.items() if not k.startswith("below_")}  # a world without descriptor kinds
    assert "uniform minus" not in tables.relations_table(["0", "1", "2"])


def test_seeds_table_averages_each_row_and_skips_the_budget_table(tmp_path):
    tables = load_stage("make_tables.py")
    runs = []
    for seed, hlc in enumerate([70.0, 80.0, 75.0]):
        run = tmp_path / f"seed{seed}"
        (run / "tables").mkdir(parents=True)
        (run / "tables" / "compare.md").write_text(
            "# t\n\n| | Many | Med. | Few | Acc. |\n| --- | --- | --- | --- | --- |\n"
            f"| BALLAD: ballad | 1.00 | 2.00 | 3.00 | {60 + seed:.2f} |\n| HLC | 1.00 | 2.00 | 3.00 | {hlc:.2f} |\n\n"
            "| | optimizer steps | learning rate | trainable parameters | weights tested |\n| --- | --- | --- | --- | --- |\n"
            "| HLC | 1000 | 0.015 | 1234 | best on val |\n")
        runs.append(run)
    tables.seeds_table([str(r) for r in runs], tmp_path / "seeds.md")
    text = (tmp_path / "seeds.md").read_text()
    assert "| HLC | 1.00 (1.00 to 1.00) | 2.00 (2.00 to 2.00) | 3.00 (3.00 to 3.00) | 75.00 (70.00 to 80.00) | 70.00, 80.00, 75.00 |" in text
    assert "| BALLAD: ballad |" in text and "61.00 (60.00 to 62.00)" in text
    assert "| HLC | 1000 | 0.015 | 1234 | best on val |" in text  # the budget, once, after the averaged rows
