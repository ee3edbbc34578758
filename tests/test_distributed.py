"""torchrun on CPU (gloo), full fine-tuning and a larger input size, on the tiny world and tiny random CLIP."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
from conftest import ROOT, load_stage, train_args

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def torchrun(n, script, args, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(ROOT / script)] + args
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, **kw)


def eval_args(world, features, coarse, out):
    return ["--dataset", "tiny", "--data-root", str(world), "--features", str(features), "--coarse", str(coarse),
            "--out", str(out), "--model", f"{world}/tiny-clip.json", "--pretrained", "none", "--workers", "0",
            "--explain", "0"]


@pytest.fixture(scope="module")
def one_and_two(made_run, tiny_world, tmp_path_factory):
    """The same training and evaluation in this process, and under torchrun with 2 processes (gloo)."""
    tmp = tmp_path_factory.mktemp("ddp")
    features = made_run / "text_features.pt"
    one, two = tmp / "n1", tmp / "n2"
    load_stage("03_train_coarse.py").main(train_args(tiny_world, features, one / "coarse.pt", "--epochs", "2"))
    load_stage("04_eval_hlc.py").main(eval_args(tiny_world, features, one / "coarse.pt", one / "results.json"))
    out = torchrun(2, "03_train_coarse.py", train_args(tiny_world, features, two / "coarse.pt", "--epochs", "2"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    out = torchrun(2, "04_eval_hlc.py", eval_args(tiny_world, features, two / "coarse.pt", two / "results.json"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return {1: one, 2: two}


def test_two_processes_train_like_one(one_and_two):
    a = torch.load(one_and_two[1] / "coarse.pt", weights_only=True)
    b = torch.load(one_and_two[2] / "coarse.pt", weights_only=True)
    assert b["meta"]["world_size"] == 2
    for key in ("prompts", "w_cls", "w_llm"):
        assert torch.allclose(a[key], b[key], atol=1e-5), (key, (a[key] - b[key]).abs().max())
    ra = json.loads((one_and_two[1] / "results.json").read_text())
    rb = json.loads((one_and_two[2] / "results.json").read_text())
    assert ra["variants"] == rb["variants"] and ra["topk_sweep"] == rb["topk_sweep"]


@pytest.mark.slow
def test_killed_two_process_run_resumes(made_run, tiny_world, tmp_path):
    features = made_run / "text_features.pt"
    args = lambda out, *extra: train_args(tiny_world, features, out, "--epochs", "12", *extra)
    full = torchrun(2, "03_train_coarse.py", args(tmp_path / "full" / "coarse.pt"))
    assert full.returncode == 0, full.stderr[-3000:]
    killed = tmp_path / "killed" / "coarse.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "03_train_coarse.py")] + args(killed)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True)
    last, deadline = killed.with_name("last.pt"), time.time() + 300
    while time.time() < deadline:
        if last.exists() and torch.load(last, weights_only=True)["epoch"] >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped_at = torch.load(last, weights_only=True)["epoch"]
    assert 2 <= stopped_at < 12 and not killed.exists()
    resumed = torchrun(2, "03_train_coarse.py", args(killed, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = torch.load(tmp_path / "full" / "coarse.pt", weights_only=True), torch.load(killed, weights_only=True)
    for key in ("prompts", "w_cls", "w_llm"):
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_full_finetuning_moves_the_visual_tower(made_run, tiny_world, tmp_path):
    stage = load_stage("03_train_coarse.py")
    features = made_run / "text_features.pt"
    stage.main(train_args(tiny_world, features, tmp_path / "full" / "coarse.pt", "--epochs", "1", "--finetune", "full",
                          "--backbone-lr", "1e-3"))
    stage.main(train_args(tiny_world, features, tmp_path / "prompts" / "coarse.pt", "--epochs", "1"))
    full = torch.load(tmp_path / "full" / "coarse.pt", weights_only=True)
    prompts_only = torch.load(tmp_path / "prompts" / "coarse.pt", weights_only=True)
    assert prompts_only["visual"] == {}  # prompts-only checkpoints do not carry the frozen tower
    torch.manual_seed(0)
    clip, _, _, _ = common.load_clip(f"{tiny_world}/tiny-clip.json", "none")  # the same random init as stage 03
    before = clip.visual.state_dict()
    assert set(full["visual"]) == set(before)
    moved = [k for k in before if not torch.equal(before[k], full["visual"][k])]
    assert "conv1.weight" in moved and "transformer.resblocks.0.mlp.c_fc.weight" in moved and "proj" in moved
    assert not any(k.startswith(("token_embedding", "ln_final", "text")) for k in full["visual"])  # no text tower
    evaluate = load_stage("04_eval_hlc.py")
    evaluate.main(eval_args(tiny_world, features, tmp_path / "full" / "coarse.pt", tmp_path / "full" / "results.json"))
    zs_full = json.loads((tmp_path / "full" / "results.json").read_text())["variants"]["zero_shot"]
    zs_made = json.loads((made_run / "results.json").read_text())["variants"]["zero_shot"]
    assert zs_full == zs_made  # zero-shot still uses the original tower


def test_larger_image_size(tiny_world, tmp_path):
    torch.manual_seed(0)
    small, _, _, _ = common.load_clip(f"{tiny_world}/tiny-clip.json", "none")
    torch.save(small.state_dict(), tmp_path / "tiny32.pt")
    big, _, preprocess, _ = common.load_clip(f"{tiny_world}/tiny-clip.json", str(tmp_path / "tiny32.pt"), image_size=48)
    assert small.visual.positional_embedding.shape == (1 + 16, 64)
    assert big.visual.positional_embedding.shape == (1 + 36, 64)  # 6 x 6 patches of 8 px, interpolated
    assert torch.equal(big.visual.positional_embedding[0], small.visual.positional_embedding[0])  # CLS kept
    vpt = common.PromptedVisual(big.visual, num_tokens=4, depth=2)
    from PIL import Image
    image = preprocess(Image.new("RGB", (100, 80)))
    assert image.shape == (3, 48, 48)
    with torch.no_grad():
        assert vpt(image[None]).shape == (1, 32)


def test_image_size_flag_runs_through_stages(made_run, tiny_world, tmp_path):
    stage = load_stage("03_train_coarse.py")
    features = made_run / "text_features.pt"
    stage.main(train_args(tiny_world, features, tmp_path / "coarse.pt", "--epochs", "1", "--image-size", "48",
                          "--grad-checkpointing", "--accum-steps", "2"))
    ckpt = torch.load(tmp_path / "coarse.pt", weights_only=True)
    assert ckpt["image_size"] == 48
    load_stage("04_eval_hlc.py").main(eval_args(tiny_world, features, tmp_path / "coarse.pt", tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["num_test"] == 20
