"""End to end through make on the tiny world, resume, and stage 03's input checks."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
from conftest import ROOT, load_stage

GROUP_NAMES = ("many", "medium", "few")


def make_args(world, run, epochs=2):
    return [f"DATASET=tiny", f"DATA_ROOT={world}", f"RUN={run}", f"MODEL={world}/tiny-clip.json",
            "PRETRAINED=none", f"EPOCHS={epochs}", f"PY={sys.executable}",
            "TRAIN_ARGS=--batch-size 8 --workers 0 --log-every 100", "EVAL_ARGS=--workers 0 --explain 6"]


@pytest.fixture(scope="module")
def made_run(tiny_world, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    out = subprocess.run(["make", "-C", str(ROOT), "all"] + make_args(tiny_world, run),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run


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
    for name in ("corpus.json", "text_features.pt", "coarse.pt", "last.pt", "log.jsonl", "results.json",
                 "results.md", "predictions.npz", "explanations.html"):
        assert (made_run / name).exists(), name
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


def test_every_number_recomputes_from_predictions(made_run):
    results = json.loads((made_run / "results.json").read_text())
    z = np.load(made_run / "predictions.npz")
    for key in ("labels", "coarse_logits", "class_prior", "desc_scores", "desc_scores_unweighted",
                "zero_shot_logits"):
        assert key in z.files
    for key in ("coarse_logits", "class_prior", "desc_scores", "desc_scores_unweighted", "zero_shot_logits"):
        assert z[key].dtype == np.float16
    labels = z["labels"]
    counts = torch.load(made_run / "coarse.pt", weights_only=True)["class_counts"].numpy()
    adjusted = z["coarse_logits"].astype(np.float32) - np.log(z["class_prior"].astype(np.float32))

    def rerank(scores, k):
        out = []
        for a, s in zip(adjusted, scores.astype(np.float32)):
            cand = sorted(range(len(a)), key=lambda c: -a[c])[:k]  # sorted() is stable
            out.append(max(cand, key=lambda c: s[c]))  # max() keeps the first best
        return np.array(out)

    mine = {"zero_shot": z["zero_shot_logits"].astype(np.float32).argmax(1),
            "coarse": z["coarse_logits"].astype(np.float32).argmax(1),
            "coarse_la": adjusted.argmax(1),
            "hlc_unweighted": rerank(z["desc_scores_unweighted"], results["k"]),
            "hlc": rerank(z["desc_scores"], results["k"]),
            "descriptors_zero_shot": z["pred_descriptors_zero_shot"]}
    for name, pred in mine.items():
        assert np.array_equal(pred, z[f"pred_{name}"]), name
        assert close(results["variants"][name], recompute(pred, labels, counts)), name
    for k, report in results["topk_sweep"].items():
        pred = rerank(z["desc_scores"], len(counts) if k == "all" else int(k))
        assert close(report, recompute(pred, labels, counts)), k
    assert results["shot_counts"] == {"many": 0, "medium": 1, "few": 4}


def test_make_is_incremental(made_run, tiny_world):
    out = subprocess.run(["make", "-C", str(ROOT), "-n", "all"] + make_args(tiny_world, made_run),
                         capture_output=True, text=True)
    assert "03_train_coarse.py" not in out.stdout and "01_build_corpus.py" not in out.stdout
    out = subprocess.run(["make", "-C", str(ROOT), "-n", "all"] + make_args(tiny_world, made_run, epochs=3),
                         capture_output=True, text=True)
    assert "03_train_coarse.py" in out.stdout and "02_cache_descriptors.py" not in out.stdout
    subprocess.run(["make", "-C", str(ROOT), "-n", "all"] + make_args(tiny_world, made_run),
                   capture_output=True, text=True)  # restore the params file


def train_args(world, features, out, *extra):
    return ["--dataset", "tiny", "--data-root", str(world), "--features", str(features), "--out", str(out),
            "--model", f"{world}/tiny-clip.json", "--pretrained", "none", "--batch-size", "8", "--workers", "0",
            "--log-every", "100", *extra]


def test_resume_matches_uninterrupted_run(made_run, tiny_world, tmp_path, monkeypatch):
    stage = load_stage("03_train_coarse.py")
    features = made_run / "text_features.pt"
    stage.main(train_args(tiny_world, features, tmp_path / "full" / "coarse.pt", "--epochs", "3"))

    original = stage.save_checkpoint

    def save_then_die(path, state):
        original(path, state)
        raise KeyboardInterrupt  # as if the run were killed right after epoch 1's checkpoint

    monkeypatch.setattr(stage, "save_checkpoint", save_then_die)
    broken = tmp_path / "broken" / "coarse.pt"
    with pytest.raises(KeyboardInterrupt):
        stage.main(train_args(tiny_world, features, broken, "--epochs", "3"))
    assert not broken.exists() and (broken.parent / "last.pt").exists()
    monkeypatch.setattr(stage, "save_checkpoint", original)
    stage.main(train_args(tiny_world, features, broken, "--epochs", "3", "--resume"))

    a = torch.load(tmp_path / "full" / "coarse.pt", weights_only=True)
    b = torch.load(broken, weights_only=True)
    for key in ("prompts", "w_cls", "w_llm", "class_counts"):
        assert torch.equal(a[key], b[key]), key
    assert len((broken.parent / "log.jsonl").read_text().splitlines()) == 3


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


def test_text_encoder_runs_only_in_stage_02(made_run, tiny_world, tmp_path, monkeypatch):
    import open_clip
    calls = []
    real_autocast = common.image_autocast

    def recording_autocast(device):
        calls.append(torch.device(device).type)
        return real_autocast(device)

    def no_text(*a, **k):
        raise AssertionError("the text encoder ran outside stage 02")

    monkeypatch.setattr(open_clip.model.CLIP, "encode_text", no_text)
    monkeypatch.setattr(common, "image_autocast", recording_autocast)
    train = load_stage("03_train_coarse.py")
    train.main(train_args(tiny_world, made_run / "text_features.pt", tmp_path / "coarse.pt", "--epochs", "1"))
    evaluate = load_stage("04_eval_hlc.py")
    evaluate.main(["--dataset", "tiny", "--data-root", str(tiny_world), "--features", str(made_run / "text_features.pt"),
                   "--coarse", str(tmp_path / "coarse.pt"), "--out", str(tmp_path / "results.json"), "--model",
                   f"{tiny_world}/tiny-clip.json", "--pretrained", "none", "--workers", "0", "--explain", "0"])
    assert calls and set(calls) == {"cpu"}  # every image-tower pass went through image_autocast


def test_image_autocast_is_bf16_on_cuda_only():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU-only machine warns that CUDA autocast is unavailable
        ctx = common.image_autocast("cuda")
    assert ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    assert ctx._enabled == torch.cuda.is_available()
    assert not common.image_autocast("cpu")._enabled
