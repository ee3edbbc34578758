"""Shared fixtures: a tiny dataset in the generic layout and a tiny random CLIP config, made on the fly."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# the tests run on the CPU, as CI runs them, on a GPU machine too (the README's "CPU only"): there the stages and their
# subprocesses would compute in bf16 and with CUDA's nondeterministic kernels, which the tests' exact comparisons (a
# resumed training equal to an uninterrupted one) do not allow for
os.environ["CUDA_VISIBLE_DEVICES"] = ""

TINY_CLIP = {
    "embed_dim": 32, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
COLOURS = {"red square": (220, 30, 30), "green square": (30, 200, 40), "blue square": (30, 40, 220),
           "yellow square": (230, 220, 30), "purple square": (150, 40, 170)}
TRAIN_COUNTS = (24, 12, 6, 3, 2)  # long-tailed
TEST_PER_CLASS = 4


def load_stage(name):
    """Import a numbered stage script (its file name is not a valid module name)."""
    spec = importlib.util.spec_from_file_location(name.replace(".py", "").replace("0", "s0", 1), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tiny_world(root):
    """A few classes of coloured squares, a few dozen 32 px images, in the generic layout."""
    from PIL import Image
    root = Path(root)
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = {"train": [], "test": []}
    for label, name in enumerate(names):
        for split, n in (("train", TRAIN_COUNTS[label]), ("test", TEST_PER_CLASS)):
            for i in range(n):
                img = np.full((32, 32, 3), 245, np.uint8)
                x, y = rng.integers(0, 12, size=2)
                img[y:y + 20, x:x + 20] = COLOURS[name]
                img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
                rel = f"images/{split}_{label}_{i}.png"
                Image.fromarray(img).save(root / rel)
                lines[split].append(f"{rel} {label}")
    for split, rows in lines.items():
        (root / f"{split}.txt").write_text("\n".join(rows) + "\n")
    (root / "classnames.txt").write_text("\n".join(names) + "\n")
    descriptors = {n: [f"a {n.split()[0]} colour", "four straight edges", "a flat shape", "it smells of paint"]
                   for n in names}
    descriptors[names[-1]] = descriptors[names[-1]][:2]  # a class with fewer descriptors than the others
    (root / "descriptors.json").write_text(json.dumps(descriptors))
    (root / "wiki").mkdir(exist_ok=True)
    for label, name in enumerate(names):
        (root / "wiki" / f"desc_{label}.txt").write_text(
            f"== {name} ==\nA {name} is a shape. It is {name.split()[0]}.\n== References ==\nIgnored text here.\n")
    (root / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    return root


@pytest.fixture(autouse=True)
def release_locks():
    """A stage's main() keeps its run directory locked for the life of the process, which here is pytest's; a CPU
    loader with workers lowers the process's torch threads (common.share_cores), which the next test gets back."""
    import torch
    threads = torch.get_num_threads()
    yield
    import common
    common.release_run_locks()
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    return make_tiny_world(tmp_path_factory.mktemp("tiny"))


# ---- the tiny world through every stage, once per test session ----

def make_args(world, run, epochs=2):
    return ["DATASET=tiny", f"DATA_ROOT={world}", f"RUN={run}", f"MODEL={world}/tiny-clip.json",
            "PRETRAINED=none", f"EPOCHS={epochs}", f"PY={sys.executable}", "WORKERS=0",
            "TRAIN_ARGS=--batch-size 8 --log-every 100", "EVAL_ARGS=--explain 6"]


@pytest.fixture(scope="session")
def made_run(tiny_world, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    out = subprocess.run(["make", "-C", str(ROOT), "all"] + make_args(tiny_world, run),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run


def make(*args, **kw):
    """make in the repository, output captured (kw: subprocess.run's, e.g. env)."""
    return subprocess.run(["make", "-C", str(ROOT), *args], capture_output=True, text=True, **kw)


def snapshot(folder):
    """Every file under folder with its modification time and size: equal snapshots, nothing written."""
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in Path(folder).rglob("*")}


def stages_to_run(args):
    """The stages `make -n all` would run."""
    out = make("-n", "all", *args)
    assert out.returncode == 0, out.stderr[-2000:]
    return {s for s in ("00_make", "01_build", "02_cache", "03_train", "04_eval") if s in out.stdout}


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """A tiny world and a finished one-epoch run of its own, one per test module, for tests that edit the data."""
    folder = tmp_path_factory.mktemp("own")
    world, run = make_tiny_world(folder / "world"), folder / "run"
    out = make("all", *make_args(world, run, epochs=1))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return world, run


def train_args(world, features, out, *extra):
    return ["--dataset", "tiny", "--data-root", str(world), "--features", str(features), "--out", str(out),
            "--model", f"{world}/tiny-clip.json", "--pretrained", "none", "--batch-size", "8", "--workers", "0",
            "--log-every", "100", *extra]
