"""The Makefile as a user meets it: the toy branch end to end on a small toy world, previews that tell the truth,
recipes that a flag does not wipe out, variables from the environment, and the make version it needs."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import common
from conftest import ROOT

SMALL_TOY = ("TOY_ARGS=--max-per-class 20 --imbalance 10 --val-per-class 2 "
             "--test-per-class 2")


def make(*args, env=None):
    return subprocess.run(["make", "-C", str(ROOT), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def small_toy(tmp_path_factory):
    """The toy branch of the Makefile (stage 00 included) on a small toy world, one epoch."""
    tmp = tmp_path_factory.mktemp("smalltoy")
    args = ["DATASET=toy", f"DATA_ROOT={tmp / 'data'}", f"RUN={tmp / 'run'}", f"PY={sys.executable}", SMALL_TOY,
            "EPOCHS=1", "TRAIN_ARGS=--log-every 7"]
    out = make("all", *args)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp, args


def test_the_toy_branch_runs_every_stage(small_toy):
    tmp, _ = small_toy
    results = json.loads((tmp / "run" / "results.json").read_text())
    assert results["dataset"] == "toy" and results["num_test"] == 36 * 2 and "descriptor_weights" in results
    for name in ("report.html", "explanations.html", "predictions.npz", "log.jsonl"):
        assert (tmp / "run" / name).exists(), name


def test_a_preview_after_a_finished_run_has_nothing_to_do(small_toy):
    tmp, args = small_toy
    preview = make("-n", "all", *args)
    assert preview.returncode == 0 and "00_make_toy" not in preview.stdout and ".py" not in preview.stdout, \
        preview.stdout
    assert make("-q", str(tmp / "run" / "results.json"), *args).returncode == 0  # -q: up to date
    assert make("all", *args).stdout.count(".py") == 0  # and a real make agrees


def test_an_extra_training_flag_keeps_the_toy_recipe(small_toy):
    tmp, _ = small_toy
    meta = torch.load(tmp / "run" / "coarse.pt", weights_only=True)["meta"]["args"]
    # TRAIN_ARGS added --log-every; the toy's batch, prompts and learning rate still come from its recipe
    assert meta["log_every"] == 7 and meta["recipe"] == "toy" and meta["batch_size"] == 32
    import importlib.util
    spec = importlib.util.spec_from_file_location("stage03", ROOT / "03_train_coarse.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    assert meta["lr_scale"] == stage.RECIPES["toy"]["lr_scale"] and meta["prompt_tokens"] == 2


def test_epochs_from_the_environment_reach_every_script(small_toy):
    tmp, args = small_toy
    env_args = [a for a in args if not a.startswith("EPOCHS=")]
    for goal in ("system", "train"):
        out = make("-n", goal, "NAME=lift", *env_args, env={"EPOCHS": "3"})
        assert out.returncode == 0 and "--epochs 3" in out.stdout, (goal, out.stdout[-1500:], out.stderr[-500:])


def test_a_training_seed_in_train_args_retrains_on_the_same_world(small_toy, tmp_path):
    """docs/toy-world.md's training-seed study: TRAIN_ARGS="--seed 11" changes the training, not the world."""
    tmp, args = small_toy
    run = tmp_path / "run11"
    shutil.copytree(tmp / "run", run, copy_function=shutil.copy2)  # keeps the times, so only the training is stale
    world = {f: f.stat().st_mtime_ns for f in (tmp / "data").rglob("*") if f.is_file()}
    args = [a for a in args if not a.startswith(("RUN=", "TRAIN_ARGS="))]
    out = make("train", *args, f"RUN={run}", "TRAIN_ARGS=--log-every 7 --seed 11")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ran = [line.split()[1] for line in out.stdout.splitlines() if line.startswith(sys.executable + " ")]
    assert ran == ["03_train_coarse.py"], out.stdout[-2000:]
    assert world == {f: f.stat().st_mtime_ns for f in (tmp / "data").rglob("*") if f.is_file()}
    old, new = (torch.load(r / "coarse.pt", weights_only=True) for r in (tmp / "run", run))
    assert old["meta"]["args"]["seed"] == 0 and new["meta"]["args"]["seed"] == 11
    assert not torch.equal(old["prompts"], new["prompts"])


def test_make_report_redraws_the_run_it_names_and_makes_no_other(small_toy, tmp_path):
    """make report rewrites report.html from what the run holds: a RUN with a typo is named with the run beside it,
    not made from scratch, and a run's changed settings or another DATASET rerun nothing."""
    tmp, args = small_toy
    args = [a for a in args if not a.startswith("RUN=")]
    typo = tmp / "rnu"
    out = make("report", *args, f"RUN={typo}")
    assert out.returncode != 0 and f"(did you mean RUN={tmp / 'run'}?)" in out.stderr, out.stderr[-1500:]
    assert "make all RUN=" in out.stderr and not typo.exists()
    out = make("-n", "report", *args, f"RUN={tmp / 'run'}", "EVAL_ARGS=--tau 0.5")
    ran = [line for line in out.stdout.splitlines() if not line.startswith("make")]
    assert out.returncode == 0 and ran == [f"{sys.executable} report.py --run {tmp / 'run'}"], out.stdout
    page = tmp / "run" / "report.html"
    os.utime(page, ns=(0, 0))
    out = make("report", *[a for a in args if not a.startswith("DATASET=")], f"RUN={tmp / 'run'}",
               "DATASET=imagenet_lt")  # a run holding the toy's outputs: report reads only the run
    assert out.returncode == 0 and page.stat().st_mtime_ns > 0, out.stdout[-1500:] + out.stderr[-1500:]


def test_an_old_make_is_stopped_with_the_fix():
    out = make("MAKE_VERSION=3.81", "-n", "help")
    assert out.returncode != 0 and "needs GNU make 4.2 or newer" in out.stderr and "gmake" in out.stderr


def test_a_system_name_with_a_typo_is_answered_with_the_close_one():
    for name, said in (("balad", "NAME=balad is not a compared system (did you mean NAME=ballad?)"),
                       ("Imbalance-VLM", "(did you mean NAME=imbalance_vlm?)"),
                       ("resnet", "NAME=resnet is not a compared system; choose one of: ballad imbalance_vlm lift"),
                       ("", "make system needs NAME; choose one of: ballad")):
        out = make("-n", "system", f"NAME={name}")
        assert out.returncode != 0 and said in out.stderr, out.stderr


def test_a_make_variable_no_stage_could_take_is_stopped_before_any_stage(tmp_path):
    """SEED=-1 reached stage 00 (numpy's bare "expected non-negative integer"), GPUS=0 ran stages 00-02 before
    torchrun stopped on a bare AssertionError, IR=0 would unpack CIFAR-100 before dividing by zero, and EPOCHS=ten or
    DEVICE=gpu ran stage 01 (an LLM's corpus, maybe) and more before a stage's flag refused it; SEED=007 named its
    folders toy-seed007 while every stage read seed 7."""
    where = [f"RUN={tmp_path / 'run'}", f"DATA_ROOT={tmp_path / 'data'}"]
    for setting, said in (("SEED=-1", "SEED=-1: the seed of every stage is a whole number from 0 to 4294967295"),
                          ("SEED=abc", "SEED=abc: the seed"), ("SEED=", "SEED=: the seed"),
                          ("SEED=4294967296", "SEED=4294967296: the seed"),
                          ("SEED=123456789012345678901234", "SEED=123456789012345678901234: the seed"),
                          ("SEED=007", "SEED=007: write the seed without leading zeros"), ("SEED=00", "SEED=00: write"),
                          ("GPUS=0", "GPUS=0: the number of torchrun processes for stages 03-04, one per GPU, is a "
                                     "whole number from 1; leave GPUS out"),
                          ("GPUS=00", "GPUS=00: the number"), ("GPUS=two", "GPUS=two: the number"),
                          ("IR=0", "IR=0: CIFAR-100-LT's imbalance ratio is a whole number from 1"),
                          ("IR=1e2", "IR=1e2: CIFAR-100-LT's"), ("IR=0100", "IR=0100: write it without leading"),
                          ("EPOCHS=010", "EPOCHS=010: write it without leading zeros"),
                          ("EPOCHS=0", "EPOCHS=0: every script's epochs is a whole number from 1; leave EPOCHS out"),
                          ("EPOCHS=ten", "EPOCHS=ten: every"),
                          ("WORKERS=-1", "WORKERS=-1: the number of image-loading"), ("WORKERS=", "WORKERS=: the"),
                          ("DEVICE=gpu", "DEVICE=gpu: not a device name; use auto (a GPU when there is one), cpu, cuda "
                                         "or cuda:N"), ("DEVICE=cuda:", "DEVICE=cuda:: not"),
                          ("DEVICE=cuda:one", "DEVICE=cuda:one: not"), ("DEVICE=", "DEVICE=: not")):
        out = make("-n", "all", setting, *where, *(("DATASET=cifar100_lt",) if setting.startswith("IR") else ()))
        assert out.returncode != 0 and said in out.stderr, (setting, out.stderr)
    for settings in (("SEED=20250101",), ("SEED=0",), ("SEED=10",), ("SEED=4294967295",), ("EPOCHS=2", "WORKERS=0"),
                     ("DEVICE=cuda:1",), ("DEVICE=cpu", "EPOCHS="), ("GPUS=2",), ("GPUS=10", "SEED=0")):
        out = make("-n", "all", *settings, *where)
        assert out.returncode == 0, (settings, out.stderr)
    assert "--nproc_per_node=10 " in out.stdout and not list(tmp_path.iterdir())


def test_a_kit_folder_with_a_space_is_stopped_with_the_fix(tmp_path):
    """Before, make all there stopped on 'RUN=runs/toy is DATA_ROOT=data/toy or holds it'."""
    kit = tmp_path / "My Projects" / "hlc"
    kit.mkdir(parents=True)
    shutil.copy(ROOT / "Makefile", kit / "Makefile")
    for goal in ("all", "test"):
        out = subprocess.run(["make", "-C", str(kit), "-n", goal], capture_output=True, text=True)
        assert out.returncode != 0 and f'the kit\'s folder "{kit}" holds a space' in out.stderr, out.stderr
        assert "path without spaces" in out.stderr


def test_links_into_a_folder_with_a_space_are_the_way_round_it(tmp_path):
    """The space error suggests a link; two links into one such folder were taken for one folder (realpath's words)."""
    for name in ("data", "run"):
        (tmp_path / "sp ace" / name).mkdir(parents=True)
        (tmp_path / f"{name}_link").symlink_to(tmp_path / "sp ace" / name)
    out = make("-n", "all", f"DATA_ROOT={tmp_path / 'data_link'}", f"RUN={tmp_path / 'run_link'}",
               f"PY={sys.executable}")
    assert out.returncode == 0 and "or holds it" not in out.stderr, out.stderr
    out = make("-n", "all", f"DATA_ROOT={tmp_path / 'data_link'}", f"RUN={tmp_path / 'data_link'}")
    assert out.returncode != 0 and "or holds it" in out.stderr


def test_an_old_python_is_stopped_before_the_environment_is_made(tmp_path):
    """numpy 2.4 needs Python 3.11: an older python3 would make .venv and then fail in pip, naming no version."""
    for name in ("Makefile", "requirements.txt", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    old = tmp_path / "python3.9"
    old.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Python 3.9.18" || exit 1\n')
    old.chmod(0o755)
    for python, shown in ((old, "Python 3.9.18"), ("python3.99", "not found")):
        out = subprocess.run(["make", "-C", str(tmp_path), "setup", f"VENV_PYTHON={python}"], capture_output=True,
                             text=True)
        assert out.returncode != 0 and f"needs Python 3.11 or newer (its pinned numpy and torch): {python} is {shown}" \
            in out.stderr, out.stderr
    assert not (tmp_path / ".venv").exists()


def test_the_pins_cover_every_package_the_kit_installs():
    """requirements.txt pins what the kit asks for and constraints.txt what those bring in, so a fresh environment
    gets the versions the kit was tested with; a dependency added by a version bump and left unpinned fails here."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    def pins(name):
        lines = (ROOT / name).read_text().splitlines()
        reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith(("#", "-"))]
        assert all(str(r.specifier).startswith("==") for r in reqs), f"{name}: not all pinned to one version"
        return {canonicalize_name(r.name) for r in reqs}
    asked, pinned = pins("requirements.txt"), pins("requirements.txt") | pins("constraints.txt")
    todo, installed = list(asked), set()
    while todo:
        name = todo.pop()
        if name not in installed:
            installed.add(name)
            todo += [canonicalize_name(r.name) for r in map(Requirement, metadata.requires(name) or [])
                     if r.marker is None or r.marker.evaluate({"extra": ""})]
    assert not installed - pinned, f"installed with the kit's requirements, pinned nowhere: {installed - pinned}"


def test_a_mistyped_variable_is_refused_naming_the_one_meant_and_others_pass_to_the_stages(tmp_path):
    """EPOCH=1 or gpus=4 would be taken silently and the run go on with its defaults (hours of the full recipe on a
    benchmark); a variable the Makefile does not read and that is close to none of its own (CUDA_VISIBLE_DEVICES)
    passes on to the stages' environment, as make passes every command-line variable."""
    out = make("-n", "all", f"RUN={tmp_path / 'run'}", "EPOCH=1", "gpus=4", f"PY={sys.executable}")
    assert out.returncode != 0 and "EPOCH=1 is not a variable of the kit, did you mean EPOCHS?" in out.stderr
    assert "gpus=4 is not a variable of the kit, did you mean GPUS?" in out.stderr, out.stderr
    out = make("-n", "all", f"RUN={tmp_path / 'run'}", "EPOCHS=1", "CUDA_VISIBLE_DEVICES=0", f"PY={sys.executable}")
    assert out.returncode == 0 and "03_train_coarse.py" in out.stdout, out.stderr


def test_an_own_interpreter_without_the_packages_is_one_line_before_any_stage(tmp_path):
    """PY=python in a conda environment not activated: the packages it lacks are named before any folder is made."""
    bare = f"{sys.executable} -S"  # the kit's own interpreter without its site-packages
    out = make("corpus", f"PY={bare}", f"RUN={tmp_path / 'run'}")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert f"PY={bare} has no numpy, PIL, torch, torchvision, open_clip, tqdm: install requirements.txt" in out.stderr
    out = make("corpus", f"PY={tmp_path / 'nowhere' / 'python'}", f"RUN={tmp_path / 'run'}")
    assert out.returncode != 0 and f"PY={tmp_path / 'nowhere' / 'python'} could not be run" in out.stderr
    assert not (tmp_path / "run").exists()
    assert make("help", f"PY={bare}").returncode == 0  # nothing to run: nothing looked for


def test_progress_in_a_log_is_a_few_lines(capsys):
    items = list(common.progress(range(200), "encode"))  # stderr is not a terminal under pytest
    lines = capsys.readouterr().err.strip().splitlines()
    assert items == list(range(200)) and 1 <= len(lines) <= 10 and "\r" not in "".join(lines)
    assert all("/s, eta" in line and line.startswith("encode: ") for line in lines)
