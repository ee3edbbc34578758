"""make bench on CPU: a small model, a few steps, every figure printed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_make_bench_prints_every_figure(tmp_path):
    import tempfile
    before = set(Path(tempfile.gettempdir()).glob("hlc-bench-*"))
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
    assert set(Path(tempfile.gettempdir()).glob("hlc-bench-*")) == before  # its JPEG files went with it


def test_flops_count_by_hand_and_against_the_published_vit_b16_figure():
    import bench
    # one block, width 4, MLP 2x, 2 patches of 1 x 1 pixels plus CLS (3 tokens), output 3: every product by hand
    embed = 2 * 2 * (3 * 1 * 1) * 4  # 2 patches x (3 x 1 x 1) inputs x width 4, 2 FLOPs per multiply-add
    block = 2 * 3 * 4 * 12 + 2 * 2 * 3 * 3 * 4 + 2 * 3 * 4 * 4 + 2 * 2 * 3 * 4 * 8  # qkv, scores+values, out, MLP
    assert bench.vit_flops(4, 1, 2, 1, 2.0, 3) == embed + block + 2 * 4 * 3
    # ViT-B/16 at 224: 17.58 GMACs forward (fvcore's and timm's figure), i.e. 35.2 GFLOPs; 20 prompts in 12 layers add
    # 20 tokens to each of the 12 blocks
    base = bench.vit_flops(768, 16, 196, 12, 4.0, 512) / 2e9
    assert abs(base - 17.58) / 17.58 < 0.01
    assert bench.vit_flops(768, 16, 196, 12, 4.0, 512, 20, 12) > bench.vit_flops(768, 16, 196, 12, 4.0, 512, 20, 6)
