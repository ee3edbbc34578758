"""make bench on CPU: a small model, a few steps, every figure printed."""
import json
import subprocess
import sys

from conftest import ROOT


def test_make_bench_prints_every_figure(tmp_path):
    out = subprocess.run(["make", "-C", str(ROOT), "bench", f"PY={sys.executable}", "DEVICE=cpu",
                          f"BENCH_ARGS=--steps 2 --workers 0 --jpegs 24 --json {tmp_path / 'bench.json'}"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for label in ("training step (synthetic)", "evaluation (VPT + plain)", "text encoding",
                  "training from JPEGs, pil", "training from JPEGs, tensor", "training from JPEGs, device", "TFLOP/s", "MFU", "implied ImageNet-LT epoch", "peak GPU memory",
                  "batch 8", "torch 2."):
        assert label in out.stdout, label
    figures = json.loads((tmp_path / "bench.json").read_text())
    for key in ("train_step", "eval", "text", "train_end_to_end_pil", "train_end_to_end_tensor",
                "train_end_to_end_device"):
        assert figures[key]["per_second"] > 0 and figures[key]["tflops"] > 0


def test_flops_of_vit_b16_with_prompts():
    import bench
    import common
    clip, _, _, _ = common.load_clip("ViT-B-16-quickgelu", "none")
    # 197 tokens: about 35.1 GFLOPs (17.6 GMACs, the usual ViT-B/16 figure); 20 prompts in 12 layers: 217 tokens
    assert abs(bench.visual_flops(clip.visual, 0, 0) / 1e9 - 35.13) < 0.05
    assert abs(bench.visual_flops(clip.visual, 20, 12) / 1e9 - 38.83) < 0.05
