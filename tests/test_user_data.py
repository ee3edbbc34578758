"""A user's data and trainings are safe: stage 00 never writes into or deletes from a folder it did not make, an
interrupted training is never thrown away without a word, make redoes what the settings and the images ask (not their
spelling), and one table holds one run."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import llm
import make_tables
import report
import toyworld
from conftest import (ROOT, load_stage, make, make_args, make_tiny_world, snapshot, stages_to_run,
                      train_args)
from systems import ballad

toy_stage = load_stage("00_make_toy.py")
cifar_stage = load_stage("00_make_cifar100_lt.py")


# ---- 1. nothing outside a folder the kit made is ever deleted ----

def users_folder(tmp_path):
    mine = tmp_path / "mine"
    (mine / "photos").mkdir(parents=True)
    (mine / "train.txt").write_text("photos/a.jpg 0\n")
    (mine / "photos" / "a.jpg").write_bytes(b"\xff\xd8 a photo")
    return mine


def test_stage00_never_writes_into_a_folder_it_did_not_make(tmp_path):
    mine = users_folder(tmp_path)
    before = snapshot(mine)
    with pytest.raises(SystemExit, match=rf"{mine} exists and was not made by 00_make_toy.py .*DATASET="):
        toy_stage.main(["--out", str(mine)])
    assert snapshot(mine) == before
    cifar = fake_cifar(tmp_path / "cifar")  # the user's CIFAR folder, holding a folder of their own named ir100
    (cifar / "ir100").mkdir()
    (cifar / "ir100" / "notes.txt").write_text("mine")
    before = snapshot(cifar)
    with pytest.raises(SystemExit, match=r"ir100 exists and was not made by 00_make_cifar100_lt.py"):
        cifar_stage.main(["--root", str(cifar), "--no-download"])
    assert {p for p in snapshot(cifar) if "images" not in str(p)} == set(before)


def test_a_forgotten_dataset_is_an_error_not_a_toy_world(tmp_path):
    mine = users_folder(tmp_path)
    before = snapshot(mine)
    said = f"DATA_ROOT={mine} holds files but no toy world", "set DATASET"
    misspelt = ("DATSET=places_lt is not a variable of the kit, did you mean DATASET?",)
    for args, env, says in (([f"DATA_ROOT={mine}"], None, said),
                            (["DATSET=places_lt", f"DATA_ROOT={mine}"], None, misspelt),  # stopped when make starts
                            ([], dict(os.environ, DATA_ROOT=str(mine)), said)):  # a DATA_ROOT the shell exported
        out = make("all", f"RUN={tmp_path / 'run'}", f"PY={sys.executable}", *args, env=env)
        assert out.returncode != 0 and all(s in out.stderr for s in says), out.stderr
    assert snapshot(mine) == before
    out = make("-n", "clean", f"RUN={mine}")  # and clean only removes a run directory
    assert out.returncode == 0
    out = make("clean", f"RUN={mine}")
    assert out.returncode != 0 and "not removed" in out.stderr and snapshot(mine) == before


def test_a_run_never_holds_the_dataset_and_clean_never_removes_one(tmp_path):
    mine = users_folder(tmp_path)
    for run in (mine, tmp_path):  # the dataset's own folder, or one above it
        out = make("-n", "all", "DATASET=mine", f"DATA_ROOT={mine}", f"RUN={run}")
        assert out.returncode != 0 and f"RUN={run} is DATA_ROOT={mine} or holds it" in out.stderr, out.stderr
    (mine / "params").mkdir()  # as if a run had been put there before: clean still keeps the dataset
    (mine / "corpus.json").write_text("{}")
    before = snapshot(mine)
    out = make("clean", f"RUN={mine}")  # DATA_ROOT not given: found by what the folder holds
    assert out.returncode != 0 and f"holds a dataset ({mine}/train.txt)" in out.stderr and snapshot(mine) == before
    (tmp_path / "run" / "params").mkdir(parents=True)
    assert make("clean", f"RUN={tmp_path}/run").returncode == 0 and not (tmp_path / "run").exists()
    run = tmp_path / "run2"  # the LLM's answers are paid for and, at temperature 0.7, not asked the same twice
    (run / "params").mkdir(parents=True)
    (run / "corpus.json").write_text("{}")
    (run / "llm_cache.jsonl").write_text('{"answer": "1. a"}\n{"answer": "1. b"}\n')
    for _ in range(2):  # and a second clean keeps them too, without complaint
        out = make("clean", f"RUN={run}")
        assert out.returncode == 0 and "but its llm_cache.jsonl (2 answers)" in out.stdout, out.stdout + out.stderr
        assert sorted(p.name for p in run.iterdir()) == ["llm_cache.jsonl"]


def tiny_toy_clip(folder):
    """A compact toy CLIP with random weights and its digest, as 00_pretrain_toy_clip.py writes them."""
    import hashlib
    config = folder / "toy-clip.json"
    config.write_text(json.dumps(toyworld.CLIP_CONFIG))
    model, _, _, _ = common.load_clip(str(config), "none")
    path = folder / "toy-clip.safetensors"
    path.write_bytes(toyworld.safetensors_bytes(*toyworld.compact_state(model.state_dict(), torch.arange(300))))
    (folder / "toy-clip.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "  toy-clip.safetensors\n")
    return path


def test_stage00_run_again_changes_nothing(tmp_path, capsys):
    clip = tiny_toy_clip(tmp_path)
    world = tmp_path / "toy"
    args = ["--out", str(world), "--clip", str(clip), "--max-per-class", "4", "--imbalance", "2",
            "--val-per-class", "1", "--test-per-class", "1"]
    toy_stage.main(args)
    before = snapshot(world)
    toy_stage.main(args)
    assert snapshot(world) == before and "(unchanged)" in capsys.readouterr().out
    toy_stage.main(["--out", str(world), "--clip", str(clip), "--max-per-class", "3", "--imbalance", "2",
                    "--val-per-class", "1", "--test-per-class", "1"])
    after = snapshot(world)
    assert set(after) - set(before) == set() and len(after) < len(before)  # files of the bigger world are gone
    (clip.with_suffix(".sha256")).write_text("0" * 64 + "  toy-clip.safetensors\n")
    with pytest.raises(ValueError, match=r"toy-clip.safetensors: sha256 .*damaged"):
        toy_stage.main(args)


def fake_cifar(root, train_per_class=3, test_per_class=2):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rows = lambda n: dict(data=np.zeros((100 * n, 3072), np.uint8), fine_labels=[c for c in range(100) for _ in range(n)])
    for name, n in (("train", train_per_class), ("test", test_per_class)):
        with open(folder / name, "wb") as f:
            pickle.dump(rows(n), f)
    with open(folder / "meta", "wb") as f:
        pickle.dump(dict(fine_label_names=[f"kind_{c}" for c in range(100)]), f)
    return root


def test_cifar_stage00_run_again_changes_nothing_and_takes_either_folder(tmp_path):
    root = fake_cifar(tmp_path / "cifar")
    cifar_stage.main(["--root", str(root), "--ir", "10"])
    before = snapshot(root)
    cifar_stage.main(["--root", str(root / "cifar-100-python"), "--ir", "10"])  # the folder itself works too
    assert snapshot(root) == before
    for args in ([f"DATA_ROOT={root}"], [f"CIFAR_ROOT={root / 'cifar-100-python'}"], [f"CIFAR_ROOT={root}/"]):
        out = make("-n", "all", "DATASET=cifar100_lt", "IR=10", f"PY={sys.executable}", *args)
        assert out.returncode == 0, out.stderr
        assert f"--data-root {root}/ir10 " in out.stdout, out.stdout[:1500]
    with pytest.raises(SystemExit, match=r"CIFAR_ROOT=<the folder holding cifar-100-python>"):
        common.check_dataset(tmp_path, "cifar100_lt")


def test_cifar_data_root_names_the_source_or_the_splits_and_stage_00_writes_where_the_chain_reads(tmp_path):
    """DATA_ROOT alone, as for the other datasets: a folder to download into (or holding the tarball the failed
    download's message asks for), an irN folder, or splits made before in a folder of another name. Before, stage 00
    went on writing into data/cifar100_lt while stage 01 read DATA_ROOT, so neither chain could run."""
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "cifar-100-python.tar.gz").write_bytes(b"")
    for args, root, ir in (([f"DATA_ROOT={tmp_path}/new"], tmp_path / "new", 100),
                           ([f"DATA_ROOT={tmp_path}/src/ir10/"], tmp_path / "src", 10),
                           ([f"DATA_ROOT={tmp_path}/src/ir50", "IR=50"], tmp_path / "src", 50)):
        out = make("-n", "all", "DATASET=cifar100_lt", f"PY={sys.executable}", f"RUN={tmp_path}/run", *args)
        assert out.returncode == 0, out.stderr
        assert f"00_make_cifar100_lt.py --root {root} --ir {ir}\n" in out.stdout, out.stdout[:1500]
        assert f"--data-root {root}/ir{ir} " in out.stdout, out.stdout[:1500]
    mine = tmp_path / "mine"  # splits stage 00 made, moved to a folder of another name: read as they are
    mine.mkdir()
    for name, text in (("train.txt", "a.png 0\n"), ("test.txt", "b.png 0\n"), (".complete", '{\n "ir": 10,\n}\n')):
        (mine / name).write_text(text)
    out = make("-n", "all", "DATASET=cifar100_lt", f"PY={sys.executable}", f"DATA_ROOT={mine}")
    assert out.returncode == 0, out.stderr
    assert "00_make_cifar100_lt.py" not in out.stdout and f"--data-root {mine} " in out.stdout, out.stdout[:1500]
    assert "runs/cifar100_lt-ir10/results.md" in out.stdout
    out = make("-n", "all", "DATASET=cifar100_lt", f"DATA_ROOT={mine}", "IR=50")
    assert out.returncode != 0 and "holds the splits of IR 10" in out.stderr
    out = make("-n", "all", "DATASET=cifar100_lt", f"DATA_ROOT={tmp_path}/src/ir10", "IR=50", f"RUN={tmp_path}/run")
    assert out.returncode != 0 and "is where the splits of IR 10 go, but IR=50. Pass IR=10" in out.stderr
    out = make("-n", "all", "DATASET=cifar100_lt", f"DATA_ROOT={tmp_path}/new", f"CIFAR_ROOT={tmp_path}/src",
               f"RUN={tmp_path}/run")
    assert out.returncode != 0 and f"stage 00 writes the splits of IR 100 to {tmp_path}/src/ir100" in out.stderr


# ---- 2 and 6. an interrupted training is never thrown away without a word, nor continued on another schedule ----

def killed_after_first_checkpoint(monkeypatch):
    original = common.Checkpoint.save

    def save_then_die(self, state):
        original(self, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(common.Checkpoint, "save", save_then_die)
    return lambda: monkeypatch.setattr(common.Checkpoint, "save", original)


def test_an_interrupted_system_stops_a_rerun_until_resumed_or_started_over(made_run, tiny_world, tmp_path,
                                                                          monkeypatch, capsys):
    args = ["--dataset", "tiny", "--data-root", str(tiny_world), "--features", str(made_run / "text_features.pt"),
            "--model", f"{tiny_world}/tiny-clip.json", "--pretrained", "none", "--batch-size", "8", "--workers", "0",
            "--out", str(tmp_path / "ballad"), "--epochs", "2"]
    restore = killed_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        ballad.main(args)
    restore()
    common.release_run_locks()
    last = tmp_path / "ballad" / "last.pt"
    with pytest.raises(SystemExit, match=rf"phase_a epoch 1 of 2 in {last}: an interrupted training is there. "
                                         r"RESUME=1 continues it \(--resume\), FRESH=1 starts over"):
        ballad.main(args)
    with pytest.raises(SystemExit, match=r"--epochs: 2 in .*last.pt, 3 now"):
        ballad.main(args[:-1] + ["3", "--resume"])  # another schedule
    assert last.exists()
    ballad.main(args + ["--fresh"])
    assert "--fresh: phase_a epoch 1 of 2 in" in capsys.readouterr().out and not last.exists()


def test_make_stops_on_an_interrupted_training(tiny_world, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = make_args(tiny_world, run, epochs=2)
    assert make("features", *args).returncode == 0
    restore = killed_after_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        load_stage("03_train_coarse.py").main(train_args(tiny_world, run / "text_features.pt", run / "coarse.pt",
                                                         "--epochs", "2"))
    restore()
    common.release_run_locks()
    out = make("train", *args)
    assert out.returncode != 0 and "an interrupted training is there. RESUME=1 continues it" in out.stderr
    assert make("train", *args, "RESUME=1", "FRESH=1").returncode != 0  # one or the other
    out = make("train", *args, "FRESH=1")
    assert out.returncode == 0 and "--fresh: epoch 1 of 2 in" in out.stdout and not (run / "last.pt").exists()


def test_a_typo_in_eval_or_train_args_stops_make_before_the_training(tiny_world, tmp_path, capsys):
    run = tmp_path / "run"
    args = [a for a in make_args(tiny_world, run) if not a.startswith("EVAL_ARGS=")]
    train = next(a for a in args if a.startswith("TRAIN_ARGS="))
    assert make("features", *args).returncode == 0
    out = make("all", *args, "EVAL_ARGS=--k 0")  # make asks stage 04 before stage 03 trains
    assert out.returncode != 0 and "--k must be 1 or more, not 0" in out.stderr, out.stderr[-2000:]
    assert "03_train_coarse.py" not in out.stdout and not (run / "last.pt").exists() and not (run / "coarse.pt").exists()
    # the other typos without make, by the check make runs: `04_eval_hlc.py --check-args` with EVAL_ARGS
    check = ["--check-args", "--dataset", "tiny", "--data-root", str(tiny_world), "--features", "none.pt",
             "--coarse", "none.pt", "--out", str(run / "results.json")]
    for typo, said in (("--k 5x", "argument --k: invalid int value: '5x'"),
                       ("--explian 6", "unrecognized arguments: --explian")):
        with pytest.raises(SystemExit):
            load_stage("04_eval_hlc.py").main(check + typo.split())
        assert said in capsys.readouterr().err, typo
    load_stage("04_eval_hlc.py").main(check + ["--k", "5"])  # and a right one passes
    # one TRAIN_ARGS value through make (it was a ZeroDivisionError); test_errors checks the others without make
    out = make("all", *[a for a in args if a != train], f"{train} --batch-size 0")
    assert out.returncode != 0 and "--batch-size must be 1 or more, not 0" in out.stderr, out.stderr[-2000:]
    assert not (run / "last.pt").exists() and not (run / "coarse.pt").exists()


# ---- 3 and 4. settings are settings, spellings are not; an image replaced in place is noticed ----


def test_spellings_and_speed_knobs_redo_nothing(own_run):
    world, run = own_run
    args = make_args(world, run, epochs=1)
    relative = os.path.relpath(world, ROOT)
    swap = lambda old, new: [new if a == old else a for a in args]
    for variant in (swap(f"DATA_ROOT={world}", f"DATA_ROOT={world}/"), swap(f"DATA_ROOT={world}", f"DATA_ROOT={relative}"),
                    swap(f"DATA_ROOT={world}", f"DATA_ROOT=./{relative}"), swap(f"RUN={run}", f"RUN={run}/"),
                    swap("WORKERS=0", "WORKERS=2"), args + ["DEVICE=cpu"], args + [f"FEATURE_CACHE={run}/elsewhere"],
                    swap("TRAIN_ARGS=--batch-size 8 --log-every 100",
                         "TRAIN_ARGS=--batch-size 8 --log-every 100 --grad-checkpointing")):
        assert stages_to_run(variant) == set(), variant


def test_an_image_replaced_in_place_is_noticed(own_run):
    world, run = own_run
    args = make_args(world, run, epochs=1)
    for split, stages in (("test", {"04_eval"}), ("train", {"03_train", "04_eval"})):
        first = world / (world / f"{split}.txt").read_text().split()[0]
        saved, stat = first.read_bytes(), first.stat()
        Image.new("RGB", (32, 32), (0, 0, 0)).save(first)  # cp new.png over it
        try:
            assert stages_to_run(args) == stages, split
        finally:
            first.write_bytes(saved)
            os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert stages_to_run(args) == set()


def test_a_split_file_of_absolute_paths_is_read_as_written(tiny_world, tmp_path):
    # a list made with `find /data/...`: before, every path was read under DATA_ROOT, so none of its images was found
    import datastamp
    lists = tmp_path / "lists"
    lists.mkdir()
    shutil.copy(tiny_world / "classnames.txt", lists)
    rows = (tiny_world / "train.txt").read_text().split("\n")
    (lists / "train.txt").write_text("\n".join(f"{tiny_world}/{r}" for r in rows if r) + "\n")
    num_classes = len(common.class_names("tiny", lists))
    samples = common.read_split(lists, "tiny", "train", num_classes)
    assert [p for p, _, _ in samples] == [str(tiny_world / r.split()[0]) for r in rows if r]
    first = Path(samples[0][0])
    before = datastamp.stamp(str(lists), str(lists / "train.txt"))
    saved, stat = first.read_bytes(), first.stat()
    Image.new("RGB", (32, 32), (0, 0, 0)).save(first)  # make notices an image replaced in place, as under the root
    try:
        assert datastamp.stamp(str(lists), str(lists / "train.txt")) != before
    finally:
        first.write_bytes(saved)
        os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    rel = rows[0].split()[0]  # a leading '/' is still read from the root
    assert datastamp.image_path(str(tiny_world), "/" + rel) == os.path.join(tiny_world, rel)


def test_images_one_folder_up_from_their_class_folders_are_found(tmp_path, monkeypatch, capsys):
    # ImageNet's own val/ is flat, where OLTR's lists name val/<wnid>/<file>: before, none of the images was found
    import basics
    import datastamp
    monkeypatch.setattr(basics, "_WARNED", set())
    world = make_tiny_world(tmp_path / "world")
    rows = [r.split() for r in (world / "test.txt").read_text().splitlines()]
    (world / "test.txt").write_text("".join(f"images/c{y}/{Path(r).name} {y}\n" for r, y in rows))
    num_classes = len(common.class_names("tiny", world))
    samples = common.read_split(world, "tiny", "test", num_classes)
    assert [p for p, _, _ in samples] == [os.path.join(world, r) for r, _ in rows]
    assert "lie one folder up" in capsys.readouterr().err
    before = datastamp.stamp(str(world), str(world / "test.txt"))
    Image.new("RGB", (32, 32), (0, 0, 0)).save(samples[-1][0])  # make notices an image replaced in place
    assert datastamp.stamp(str(world), str(world / "test.txt")) != before
    os.remove(samples[-1][0])  # a missing image is still named by its line
    with pytest.raises(FileNotFoundError, match=f"test.txt:{len(rows)}: image not found"):
        common.read_split(world, "tiny", "test", num_classes)


def test_toy_seeds_gives_each_seed_its_own_folders(tmp_path):
    out = make("-n", "toy-seeds", f"RUN={tmp_path}/r", f"DATA_ROOT={tmp_path}/d", f"PY={sys.executable}")
    assert out.returncode == 0, out.stderr
    for s, suffix in ((0, ""), (1, "-seed1"), (2, "-seed2")):
        assert f"SEED={s} PY={sys.executable} RUN={tmp_path}/r{suffix} DATA_ROOT={tmp_path}/d{suffix}" in out.stdout
    assert f"--seeds {tmp_path}/r {tmp_path}/r-seed1 {tmp_path}/r-seed2" in out.stdout


# ---- 5. one table, one run ----

def fake_results(path, split="test", **meta):
    facts = dict(split=split, eval_split_digest="e1", shot_rule="lift", train_split_digest="t1",
                 text_features_digest="f1", classnames_digest="c1", coarse_digest="k1")
    facts.update(meta)
    v = {k: dict(overall=50.0, many=50.0, medium=50.0, few=50.0) for k in
         ("zero_shot", "descriptors_zero_shot", "coarse", "coarse_la", "hlc_unweighted", "hlc")}
    res = dict(dataset="tiny", split=split, num_test=10, k=5, tau=1.0, variants=v,
               topk_sweep={"1": v["hlc"], "all": v["hlc"]}, tau_sweep={"1": {"coarse_la": v["hlc"], "hlc": v["hlc"]}},
               zero_shot_reweighted=v["hlc"], shot_counts=dict(many=1, medium=1, few=1), shot_rule="lift",
               system="X", meta=facts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res))
    return res


def test_rows_of_another_run_are_named_not_drawn(tmp_path):
    run = tmp_path / "run"
    full = fake_results(run / "results.json")
    for row in ("lp", "vpt"):
        fake_results(run / "ablation" / row / "results.json")
    fake_results(run / "systems" / "lift" / "results.json", split="val")  # an older run's, on val
    with pytest.raises(SystemExit, match=r"(?s)systems/lift/results.json: split 'val', results.json 'test'.*make "
                                         r"compare"):
        make_tables.comparison_rows(run, full)
    (run / "explanations.html").write_text("<body data-coarse='an older model'>")
    report.write_report(run, quiet=True)
    page = (run / "report.html").read_text()
    assert "systems/lift/results.json" in page and "no explanations.html of these results" in page
    out = make("-n", "compare", f"RUN={tmp_path}/r2", "EVAL_ARGS=--split val")
    assert out.returncode != 0 and "use SPLIT=... and SHOT_RULE=..." in out.stderr
    for typo, says in (("SPLIT=tset", "SPLIT=tset: the evaluation split is train, val or test"),
                       ("SHOT_RULE=vlltr", "SHOT_RULE=vlltr: the shot rule is lift"),
                       ("DECODE=tensr", "DECODE=tensr: images are decoded by pil")):  # refused before any training,
        out = make("all", f"RUN={tmp_path}/r3", typo)  # not by stage 04 after it
        assert out.returncode != 0 and says in out.stderr and not (tmp_path / "r3").exists(), out.stderr


# ---- 7. caches keyed by what they depend on ----

def test_the_llm_cache_is_keyed_by_endpoint_and_temperature(tmp_path):
    path = tmp_path / "llm_cache.jsonl"
    llm.Cache(path, "http://a/v1", 0.7).put("m", "q", "cat", 0, "1. fur")
    llm.Cache(path, "http://a/v1", 0.7).put("m", "q", "dog", 0, "   ")  # an empty answer is never kept
    assert llm.Cache(path, "http://a/v1/", 0.7).get("m", "q", "cat", 0) == "1. fur"
    assert llm.Cache(path, "http://b/v1", 0.7).get("m", "q", "cat", 0) is None
    assert llm.Cache(path, "http://a/v1", 1.0).get("m", "q", "cat", 0) is None
    assert llm.Cache(path, "http://a/v1", 0.7).get("m", "q", "dog", 0) is None and len(path.read_text().splitlines()) == 1


def test_the_papers_placeholder_and_an_unknown_one(tmp_path):
    assert llm.fill("List {m} features of {CLS} in a photo.", 10, "owl") == "List 10 features of owl in a photo."
    with pytest.raises(ValueError, match=r"--llm-question .*cannot fill 'klass' in it; its placeholders are"):
        llm.fill("List {m} features of {klass}.", 10, "owl")
    world = make_tiny_world(tmp_path / "w")
    out = subprocess.run([sys.executable, str(ROOT / "01_build_corpus.py"), "--dataset", "tiny", "--data-root",
                          str(world), "--out", str(tmp_path / "c.json"), "--llm-model", "m", "--llm-question",
                          "{klass}", "--dry-run"], capture_output=True, text=True)
    assert out.returncode == 1 and "01_build_corpus.py: error: --llm-question" in out.stderr
    assert "Traceback" not in out.stderr


def test_an_edited_model_config_misses_the_feature_cache(tiny_world, tmp_path):
    samples = common.read_split(tiny_world, "tiny", "test", 5)
    config = tmp_path / "m.json"
    shutil.copy(tiny_world / "tiny-clip.json", config)
    key = lambda: common.feature_cache_file(tmp_path / "cache", "test", samples,
                                            common.model_fingerprint(str(config), "none"), "none", 0, "transform")
    before = key()
    config.write_text(config.read_text().replace('"quick_gelu": true', '"quick_gelu": false'))
    assert key() != before


def test_the_scripts_run_by_path_from_any_folder(tmp_path):
    """One stage or system run by hand from another folder (python /kit/systems/lift.py, python /kit/00_make_toy.py):
    each finds the kit's modules and the committed toy CLIP beside itself, not in the current folder."""
    systems = sorted(str(p) for p in (ROOT / "systems").glob("*.py") if p.stem not in ("__init__", "frame"))
    # each as `python systems/<name>.py --help` runs it (its folder first on sys.path, no package), one after the
    # other in one process, torch imported once; the kit's own modules are forgotten between them
    each = ("import runpy, sys\n"
            "for script in sys.argv[1:]:\n"
            "    sys.path[:] = [script.rsplit('/', 1)[0]] + [p for p in sys.path[1:] if p not in ('', KIT)]\n"
            "    for m in [m for m in sys.modules if m.split('.')[0] in ('common', 'basics', 'systems')]:\n"
            "        del sys.modules[m]\n"
            "    sys.argv = [script, '--help']\n"
            "    try:\n"
            "        runpy.run_path(script, run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, (script, e.code)\n"
            "    print('ran', script)\n").replace("KIT", repr(str(ROOT)))
    out = subprocess.run([sys.executable, "-c", each, *systems], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=""))
    assert out.returncode == 0 and out.stdout.count("ran ") == len(systems) == 5, out.stderr[-1000:]
    small = ["--max-per-class", "3", "--imbalance", "2", "--val-per-class", "1", "--test-per-class", "1"]
    out = subprocess.run([sys.executable, str(ROOT / "00_make_toy.py"), "--out", "toy", *small], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0 and (tmp_path / "toy" / "clip" / "toy-clip.safetensors").exists(), out.stderr[-1000:]
