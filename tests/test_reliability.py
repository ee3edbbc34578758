"""A run is redone when its inputs change, refuses what it cannot trust, and fails loudly."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import basics
import common
from conftest import ROOT, load_stage, make, make_args, snapshot, stages_to_run, train_args
from systems import ballad, imbalance_vlm as ivlm

corpus_stage = load_stage("01_build_corpus.py")


def test_make_follows_the_data_and_a_preview_writes_nothing(own_run):
    world, run = own_run
    args = make_args(world, run, epochs=1)
    assert stages_to_run(args) == set()
    before = snapshot(run)
    for preview in (["-n", "all", *make_args(world, run, epochs=3)], ["-q", "all", *make_args(world, run, epochs=3)]):
        make(*preview)
        assert snapshot(run) == before, preview  # neither writes a params file nor anything else
    assert "03_train" in make("-n", "all", *make_args(world, run, epochs=3)).stdout
    assert make("-q", "all", *make_args(world, run, epochs=3)).returncode == 1
    assert stages_to_run(args) == set()  # going back: still nothing to do, no retraining
    assert "03_train" not in make("-n", "all", *args, "RESUME=1").stdout  # RESUME is not a training setting

    clock = [time.time()]  # file times set by hand, each later than the last: no waiting for the clock

    def later():
        clock[0] += 10
        return clock[0], clock[0]

    def edited(path, change):
        old = path.read_bytes()
        change(path)
        os.utime(path, later())
        try:
            return stages_to_run(args)
        finally:
            path.write_bytes(old)
            os.utime(path, later())
            stamp = later()
            for f in run.rglob("*"):  # the outputs are newer again: the change is undone
                if f.is_file():
                    os.utime(f, stamp)

    swap = lambda p: p.write_text(p.read_text().replace(" 0\n", " 1\n", 1))
    assert edited(world / "train.txt", swap) == {"03_train", "04_eval"}
    rename = lambda p: p.write_text(p.read_text().replace("red square", "crimson square"))
    assert edited(world / "classnames.txt", rename) == {"01_build", "02_cache", "03_train", "04_eval"}
    wiki = lambda p: p.write_text(p.read_text() + "One more sentence.\n")
    assert edited(world / "wiki" / "desc_3.txt", wiki) == {"01_build", "02_cache", "03_train", "04_eval"}
    config = lambda p: p.write_text(p.read_text().replace('"layers": 2', '"layers": 3', 1))
    assert edited(world / "tiny-clip.json", config) == {"02_cache", "03_train", "04_eval"}
    image = world / "images" / "test_1_0.png"
    saved, stat = image.read_bytes(), image.stat()
    image.unlink()
    try:
        assert stages_to_run(args) == {"04_eval"}  # a test image is gone: only the evaluation reads it
    finally:
        image.write_bytes(saved)
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_failed_stage_records_nothing_so_fixing_a_typo_redoes_nothing(own_run):
    world, run = own_run
    args = make_args(world, run, epochs=1)
    typo = [a.replace("--batch-size 8", "--batch-size 8x") if a.startswith("TRAIN_ARGS") else a for a in args]
    out = make("all", *typo)
    assert out.returncode != 0 and "--batch-size" in out.stderr  # stage 03 refused it and wrote nothing
    missing = make("corpus", *args, f"DESCRIPTORS={world}/descriptors-typo.json")
    assert missing.returncode != 0 and "descriptors-typo.json" in missing.stderr
    assert "01_build_corpus.py: error:" in missing.stderr and "Traceback" not in missing.stderr  # one line, no trace
    assert stages_to_run(args) == set()  # the typos fixed: nothing to redo, no retraining


def interrupted(stage, args, monkeypatch):
    """Run a stage's main(args) as its command line does (run_script) and interrupt it (Ctrl-C) right after its first
    checkpoint: it exits with status 130, and last.pt stays."""
    original = common.Checkpoint.save

    def save_then_die(self, state):
        original(self, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(common.Checkpoint, "save", save_then_die)
    monkeypatch.delenv("HLC_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stop:
        common.run_script(lambda: stage.main(args))
    assert stop.value.code == 130
    monkeypatch.setattr(common.Checkpoint, "save", original)
    common.note_for_interrupt()
    common.release_run_locks()


def test_resume_refuses_other_settings(made_run, tiny_world, tmp_path, monkeypatch):
    stage = load_stage("03_train_coarse.py")
    out = tmp_path / "coarse.pt"
    interrupted(stage, train_args(tiny_world, made_run / "text_features.pt", out, "--epochs", "2"), monkeypatch)
    for flag, value, old, new in (("--lr", "1e-3", "0.0005", "0.001"), ("--batch-size", "4", "8", "4"),
                                  ("--seed", "3", "0", "3"), ("--epochs", "3", "2", "3")):
        with pytest.raises(SystemExit, match=rf"{flag}: {old} in .*last.pt, {new} now"):
            stage.main(train_args(tiny_world, made_run / "text_features.pt", out, "--epochs", "2", "--resume",
                                  flag, value))
    last = out.with_name("last.pt")  # as a kit without --cls-init wrote it: that flag's default is what it did
    state = torch.load(last, weights_only=True)
    del state["meta"]["args"]["cls_init"]
    torch.save(state, last)
    with pytest.raises(SystemExit, match=r"--cls-init: None in .*last.pt, 'random' now"):
        stage.main(train_args(tiny_world, made_run / "text_features.pt", out, "--epochs", "2", "--resume",
                              "--cls-init", "random"))
    stage.main(train_args(tiny_world, made_run / "text_features.pt", out, "--epochs", "2", "--resume", "--workers", "0"))
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["meta"]["args"]["epochs"] == 2 and ckpt["meta"]["args"]["lr"] == 5e-4


def test_an_interrupt_ends_in_one_line_naming_what_is_kept(made_run, tiny_world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "coarse.pt"
    interrupted(load_stage("03_train_coarse.py"), train_args(tiny_world, made_run / "text_features.pt", out,
                                                             "--epochs", "2", "--workers", "0"), monkeypatch)
    err = capsys.readouterr().err
    assert f": interrupted; {out.with_name('last.pt')} holds epoch 1 of 2: RESUME=1 continues it" in err
    assert "Traceback" not in err and out.with_name("last.pt").exists()


def renamed_world(world, tmp_path):
    other = tmp_path / "renamed"
    shutil.copytree(world, other)
    names = (other / "classnames.txt").read_text().replace("red square", "crimson square")
    (other / "classnames.txt").write_text(names)
    return other


def test_inputs_made_for_something_else_are_refused(made_run, tiny_world, tmp_path):
    train = load_stage("03_train_coarse.py")
    evaluate = load_stage("04_eval_hlc.py")
    features = made_run / "text_features.pt"
    other = renamed_world(tiny_world, tmp_path)  # same class count, other names
    with pytest.raises(SystemExit, match=r"(?s)text_features.pt was not made from.*classnames_digest differs.*renamed"):
        train.main(train_args(other, features, tmp_path / "c.pt", "--epochs", "1"))

    def eval_args(world, coarse, features=features):
        return ["--dataset", "tiny", "--data-root", str(world), "--features", str(features), "--coarse", str(coarse),
                "--out", str(tmp_path / "r" / "results.json"), "--model", f"{tiny_world}/tiny-clip.json",
                "--pretrained", "none", "--workers", "0", "--explain", "0"]

    moved = tmp_path / "moved"  # the same images, another training split: other shot groups
    shutil.copytree(tiny_world, moved)
    lines = (moved / "train.txt").read_text().splitlines()
    (moved / "train.txt").write_text("\n".join(lines[:-3]) + "\n")
    with pytest.raises(SystemExit, match=r"(?s)coarse.pt was not made from.*train_split_digest differs"):
        evaluate.main(eval_args(moved, made_run / "coarse.pt"))
    # a coarse.pt trained on text features with another descriptor count M
    text = torch.load(features, weights_only=True)
    text["descriptors"], text["desc_mask"] = text["descriptors"][:, :3], text["desc_mask"][:, :3]
    text["meta"]["digest"] = common.tensor_digest(text["corpus"], text["corpus_labels"], text["descriptors"],
                                                  text["desc_mask"], text["classname"], text["corpus_norm"])
    torch.save(text, tmp_path / "m3.pt")
    with pytest.raises(SystemExit, match=r"(?s)coarse.pt was not made from.*m3.pt.*text_features_digest differs"):
        evaluate.main(eval_args(tiny_world, made_run / "coarse.pt", tmp_path / "m3.pt"))


def test_a_weights_file_spelt_another_way_is_the_same_file(tmp_path, monkeypatch):
    """make names the toy CLIP's weights relative to the repository; a stage run by hand may name them absolute."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"weights")
    meta = {"stage": "02_cache_descriptors", "model": "m", "pretrained": "w.pt"}
    common.check_meta(meta, "text_features.pt", model="m", pretrained=str(tmp_path / "w.pt"))
    assert common.model_fingerprint("m", "w.pt") == common.model_fingerprint("m", str(tmp_path / "w.pt"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "w.pt").write_bytes(b"other weights")  # same name, other bytes: the fingerprint tells them apart
    assert common.model_fingerprint("m", "w.pt") != common.model_fingerprint("m", "b/w.pt")
    with pytest.raises(SystemExit, match=r"text_features.pt does not fit this run \(pretrained: file has 'w.pt', this "
                                          r"run needs 'openai'\)"):
        common.check_meta(meta, "text_features.pt", model="m", pretrained="openai")
    # a stage run by hand with the paper's CLIP by default, on features of the toy CLIP: the message says what to give
    meta["args"] = {"model": "data/toy/clip/toy-clip.json", "pretrained": "data/toy/clip/toy-clip.safetensors"}
    with pytest.raises(SystemExit, match=r"Or give this stage the CLIP the file was made with: --model data/toy/"
                                          r"clip/toy-clip.json --pretrained data/toy/clip/toy-clip.safetensors"):
        common.check_meta(meta, "text_features.pt", model="ViT-B-16-quickgelu", pretrained="openai")


def test_a_second_run_on_the_same_run_directory_is_refused(made_run, tiny_world, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); import common; "
                               "common.hold_run_lock(sys.argv[2], 'make all (first)'); print('held', flush=True); "
                               "time.sleep(60)", str(ROOT), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match=rf"is in use by make all \(first\) \(pid {holder.pid} "):
            load_stage("03_train_coarse.py").main(train_args(tiny_world, made_run / "text_features.pt",
                                                             tmp_path / "coarse.pt", "--epochs", "1"))
        assert not (tmp_path / "coarse.pt").exists() and not (tmp_path / "log.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    load_stage("03_train_coarse.py").main(train_args(tiny_world, made_run / "text_features.pt", tmp_path / "coarse.pt",
                                                     "--epochs", "1"))  # the lock went with the killed holder


def test_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full_disk(obj, f, *a, **k):  # f: the open temporary file
        f.write(b"x" * 2816)
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 2816 vs 2710")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=rf"could not write {tmp_path / 'last.pt'}: \d+ bytes free \(.*unexpected pos"):
        common.atomic_torch_save({"a": 1}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_files_as_they_come(tiny_world, tmp_path):
    world = tmp_path / "w"
    shutil.copytree(tiny_world, world)
    text = (world / "train.txt").read_text()
    (world / "train.txt").write_bytes("\ufeff".encode() + text.encode())  # a Windows editor's byte-order mark
    assert common.read_split(world, "tiny", "train", 5)[0][0] == str(world / text.split()[0])
    (world / "classnames.txt").write_text("red square\n\ngreen square\n")
    with pytest.raises(ValueError, match=r"classnames.txt:2: blank class name"):
        common.class_names("tiny", world)
    grey16 = np.full((32, 32), 40000, dtype=np.uint16)  # 16-bit greyscale: 40000 / 65535 of white
    Image.fromarray(grey16).save(world / "deep.png")
    pixel = np.asarray(common.open_rgb(world / "deep.png"))[0, 0]
    assert pixel.tolist() == [156, 156, 156]  # scaled (40000 / 257), not clipped to white


def test_no_benchmark_data_is_said_before_any_request(tmp_path):
    from llm_server import FakeLLM
    with FakeLLM() as server:
        with pytest.raises(SystemExit, match=rf"DATA_ROOT={tmp_path} holds no ImageNet-LT: ImageNet_LT_train.txt"):
            corpus_stage.main(["--dataset", "imagenet_lt", "--data-root", str(tmp_path), "--out",
                               str(tmp_path / "c.json"), "--llm-model", "m", "--llm-base-url", server.url])
    assert server.requests == 0


def test_a_misspelt_dataset_name_is_pointed_at_the_known_one(tmp_path):
    with pytest.raises(SystemExit, match=r"DATASET=imagent_lt is not a known dataset.*did you mean DATASET=imagenet_lt"):
        common.check_dataset(tmp_path, "imagent_lt")
    with pytest.raises(SystemExit) as own_data:  # a name of one's own gets no guess
        common.check_dataset(tmp_path, "birds")
    assert "did you mean" not in str(own_data.value)


def test_log_line_comes_after_the_checkpoint(made_run, tiny_world, tmp_path, monkeypatch):
    stage = load_stage("03_train_coarse.py")
    args = train_args(tiny_world, made_run / "text_features.pt", tmp_path / "coarse.pt", "--epochs", "3")
    real = common.append_line

    def killed_after_epoch_2(path, line):
        if json.loads(line)["epoch"] == 2:
            raise KeyboardInterrupt  # last.pt holds epoch 2, the log does not yet
        real(path, line)

    monkeypatch.setattr(common, "append_line", killed_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        stage.main(args)
    monkeypatch.setattr(common, "append_line", real)
    stage.main(args + ["--resume"])
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


# ---- issue 21: no stale number without a word, no run lost to a second run, no traceback for a bad file ----

def copy_world(tiny_world, tmp_path, name="w"):
    world = tmp_path / name
    shutil.copytree(tiny_world, world)
    return world


def test_an_image_replaced_under_its_name_misses_the_feature_cache(tiny_world, tmp_path):
    world = copy_world(tiny_world, tmp_path)
    samples = common.read_split(world, "tiny", "test", 5)
    key = lambda: common.feature_cache_file(tmp_path / "cache", "test", samples, "m", "none", 0, "transform")
    before = key()
    image = Path(samples[0][0])
    Image.new("RGB", (32, 32), (0, 0, 0)).save(image)  # another picture under the same name
    os.utime(image, (time.time() + 5, time.time() + 5))
    assert key() != before


def test_a_corrupt_cache_file_is_encoded_again(tmp_path, capsys):
    path = tmp_path / "test-0123.pt"
    path.write_bytes(b"PK\x03\x04 torn off")
    assert common.load_cached_features(path, 20) is None and not path.exists()
    assert "cannot be read" in capsys.readouterr().err
    torch.save(torch.zeros(3, 4), path)  # the features of another image list length
    assert common.load_cached_features(path, 20) is None and not path.exists()
    torch.save(torch.zeros(20, 4), path)
    assert common.load_cached_features(path, 20).shape == (20, 4)


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_broken_checkpoint_names_its_file_and_what_to_do(made_run, tmp_path, damage):
    for name, what in (("coarse.pt", "stage 03"), ("text_features.pt", "stage 02")):
        data = (made_run / name).read_bytes()
        broken = tmp_path / name
        broken.write_bytes(b"" if damage == "empty" else data[:len(data) // 2])
        with pytest.raises(ValueError, match=rf"{broken}: cannot be read .*Delete it and run {what}"):
            common.load_checkpoint(broken, what)


def test_a_relabelled_training_split_is_not_resumed(made_run, tiny_world, tmp_path):
    world = copy_world(tiny_world, tmp_path)
    args = ["--dataset", "tiny", "--data-root", str(world), "--features", str(made_run / "text_features.pt"),
            "--model", f"{tiny_world}/tiny-clip.json", "--pretrained", "none", "--epochs", "1", "--batch-size", "8",
            "--workers", "0", "--out", str(tmp_path / "ballad")]
    ballad.main(args)
    lines = (world / "train.txt").read_text().splitlines()
    path, label = lines[0].rsplit(maxsplit=1)
    lines[0] = f"{path} {(int(label) + 1) % 5}"
    (world / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match=r"(?s)phase_a.pt was not made from this run's inputs.*train_split_digest"):
        ballad.main(args + ["--resume"])


def test_resume_refuses_a_phase_of_another_schedule(made_run, tiny_world, tmp_path):
    args = ["--dataset", "tiny", "--data-root", str(tiny_world), "--features", str(made_run / "text_features.pt"),
            "--model", f"{tiny_world}/tiny-clip.json", "--pretrained", "none", "--batch-size", "8", "--workers", "0",
            "--out", str(tmp_path / "ballad")]
    ballad.main(args + ["--epochs", "2"])
    assert not (tmp_path / "ballad" / "last.pt").exists()  # the results are written: no interrupted run is left
    for epochs in ("1", "3"):
        with pytest.raises(SystemExit, match=rf"--epochs: 2 in .*phase_a.pt, {epochs} now"):
            ballad.main(args + ["--epochs", epochs, "--resume"])


def test_a_system_resumes_a_checkpoint_from_before_a_new_flag(made_run, tiny_world, tmp_path, monkeypatch):
    args = ["--dataset", "tiny", "--data-root", str(tiny_world), "--features", str(made_run / "text_features.pt"),
            "--model", f"{tiny_world}/tiny-clip.json", "--pretrained", "none", "--epochs", "2", "--batch-size", "8",
            "--workers", "0", "--out", str(tmp_path / "ballad")]
    interrupted(ballad, args, monkeypatch)
    last = tmp_path / "ballad" / "last.pt"  # as a kit without --adapter wrote it: that flag's default is what it did
    state = torch.load(last, weights_only=True)
    del state["meta"]["args"]["adapter"]
    torch.save(state, last)
    with pytest.raises(SystemExit, match=r"--adapter: None in .*last.pt, 'paper' now"):
        ballad.main(args + ["--resume", "--adapter", "paper"])
    ballad.main(args + ["--resume"])
    assert not last.exists() and (tmp_path / "ballad" / "results.json").exists()


@pytest.mark.parametrize("bad, message", [("label", r"test.txt:1: label -1 is outside \[0, 5\)"),
                                          ("empty image", r"test.txt:1: image .* is an empty \(zero-byte\) file"),
                                          ("empty split", r"test.txt: no 'relative/path label' line in it"),
                                          ("underscore", r"test.txt:1: label '1_0' is not a plain integer")])
def test_a_bad_evaluation_split_stops_training_before_it_starts(made_run, tiny_world, tmp_path, bad, message):
    world = copy_world(tiny_world, tmp_path)
    lines = (world / "test.txt").read_text().splitlines()
    path, _ = lines[0].rsplit(maxsplit=1)
    if bad == "label":
        lines[0] = f"{path} -1"
    elif bad == "underscore":
        lines[0] = f"{path} 1_0"
    elif bad == "empty image":
        (world / path).write_bytes(b"")
    elif bad == "empty split":
        lines = []
    (world / "test.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    out = tmp_path / "run" / "coarse.pt"
    with pytest.raises(ValueError, match=message):
        load_stage("03_train_coarse.py").main(train_args(world, made_run / "text_features.pt", out, "--epochs", "1"))
    assert not (out.parent / "last.pt").exists()  # nothing was trained


def test_a_bad_image_ends_in_one_line_naming_its_split_line(made_run, tiny_world, tmp_path):
    world = copy_world(tiny_world, tmp_path)
    first = (world / "train.txt").read_text().splitlines()[0].rsplit(maxsplit=1)[0]
    data = (world / first).read_bytes()
    (world / first).write_bytes(data[:len(data) // 2])  # a truncated PNG, read in a loader worker
    out = subprocess.run([sys.executable, "03_train_coarse.py", *train_args(world, made_run / "text_features.pt",
                                                                            tmp_path / "c.pt", "--epochs", "1"),
                          "--workers", "1"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("03_train_coarse.py: error: ") and "train.txt:1: cannot read image" in line, line


def test_two_writers_of_one_file_each_write_their_own_temporary(tmp_path):
    target = tmp_path / "features.pt"
    with common.atomic_path(target) as a, common.atomic_path(target) as b:
        assert a != b
        a.write_text("first")
        b.write_text("second")
    assert target.read_text() in ("first", "second") and list(tmp_path.iterdir()) == [target]


def test_a_training_set_smaller_than_the_batch_runs_with_a_smaller_batch(made_run, tiny_world, tmp_path, capsys):
    ivlm.main(["--dataset", "tiny", "--data-root", str(tiny_world), "--features", str(made_run / "text_features.pt"),
               "--model", f"{tiny_world}/tiny-clip.json", "--pretrained", "none", "--epochs", "1", "--stage2",
               "--workers", "0", "--out", str(tmp_path / "ivlm")])  # the recipe's batch is 256, the set 47 images
    assert "--batch-size 256 is larger than the training set (47 images); using 47" in capsys.readouterr().out
    assert json.loads((tmp_path / "ivlm" / "results.json").read_text())["training"]["batch_size"] == 47


def test_doubtful_data_is_said_once(tiny_world, tmp_path, capsys):
    world = copy_world(tiny_world, tmp_path)
    train = (world / "train.txt").read_text().splitlines()
    (world / "train.txt").write_text("\n".join(train + train[:2]) + "\n")  # two lines again
    (world / "test.txt").write_text((world / "test.txt").read_text() + train[0] + "\n")  # a training image in test
    (world / "classnames.txt").write_text((world / "classnames.txt").read_text().replace("green square", "red square"))
    basics._WARNED.clear()
    for _ in range(2):
        names = common.class_names("tiny", world)
        samples = common.read_split(world, "tiny", "train", len(names))
        common.check_eval_split(world, "tiny", "", len(names), samples)
    err = capsys.readouterr().err
    for said in ("2 lines repeat an image listed before", "1 images are in both the training split and the 'test'",
                 "1 class names are shared by several classes: 'red square' (0, 1)"):
        assert err.count(said) == 1, (said, err)


def test_a_run_of_another_dataset_is_refused(made_run, tiny_world, tmp_path):
    out = make("corpus", "DATASET=other", f"DATA_ROOT={tiny_world}", f"RUN={made_run}",
               f"PY={sys.executable}", "DESCRIPTORS=", "WIKI=")
    assert out.returncode != 0 and f"RUN={made_run} holds the outputs of DATASET=tiny" in out.stderr
    assert "not DATASET=other" in out.stderr


def test_paths_with_spaces_are_refused_at_once_and_image_folders_with_them_are_fine(tiny_world, tmp_path):
    spaced = tmp_path / "my data"
    shutil.copytree(tiny_world, spaced)
    out = make("-n", "all", *make_args(spaced, tmp_path / "run"))
    assert out.returncode != 0 and "holds a space, which make cannot keep in a file name" in out.stderr
    world = copy_world(tiny_world, tmp_path, "w2")
    (world / "images" / "sub dir").mkdir()
    first = (world / "train.txt").read_text().splitlines()[0].rsplit(maxsplit=1)[0]
    shutil.copy(world / first, world / "images" / "sub dir" / "a.png")
    (world / "train.txt").write_text((world / "train.txt").read_text() + "images/sub dir/a.png 0\n")
    out = make("-n", "all", *make_args(world, tmp_path / "run2"))  # an image folder with a space is no prerequisite:
    assert out.returncode == 0 and "03_train_coarse.py" in out.stdout, out.stderr  # its images are stamped instead


def test_a_missing_weights_file_is_refused_before_anything_runs(tiny_world, tmp_path):
    args = [a for a in make_args(tiny_world, tmp_path / "run") if not a.startswith("PRETRAINED=")]
    out = make("all", *args, f"PRETRAINED={tmp_path}/missing.pt")
    assert out.returncode != 0 and f"PRETRAINED={tmp_path}/missing.pt: weights file not found" in out.stderr
    assert not (tmp_path / "run" / "corpus.json").exists()
    with pytest.raises(FileNotFoundError, match="missing.pt: weights file not found"):
        common.load_clip(f"{tiny_world}/tiny-clip.json", str(tmp_path / "missing.pt"))


def test_a_second_make_on_a_run_in_use_is_refused_and_the_first_finishes(tiny_world, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(["make", "-C", str(ROOT), "features", *make_args(tiny_world, run, epochs=1)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(600):  # until the first make is past stage 01, between two stages or in stage 02
        if (run / "corpus.json").exists() or first.poll() is not None:
            break
        time.sleep(0.1)
    second = make("all", *make_args(tiny_world, run, epochs=1))
    assert second.returncode != 0 and f"RUN={run} is in use by make pid {first.pid}" in second.stderr, second.stderr
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    assert make("features", *make_args(tiny_world, run, epochs=1)).returncode == 0  # the lock went with the first


def test_a_run_folder_made_for_nothing_is_removed_again_and_one_made_by_you_is_kept(tmp_path):
    missing = tmp_path / "no-such-dataset"  # a typo'd DATASET or DATA_ROOT: stage 01 stops at once
    args = ["DATASET=imagnet_lt", f"DATA_ROOT={missing}", "PRETRAINED=none", f"PY={sys.executable}"]
    out = make("all", *args, f"RUN={tmp_path}/new/run")
    assert out.returncode != 0 and "did you mean DATASET=imagenet_lt?" in out.stderr, out.stderr[-2000:]
    for _ in range(50):  # the lock's keeper tidies up within 0.2 s of make's end
        if not (tmp_path / "new").exists():
            break
        time.sleep(0.1)
    assert not (tmp_path / "new").exists()  # the run folder and the parent make created for it
    mine = tmp_path / "mine"
    mine.mkdir()
    out = make("all", *args, f"RUN={mine}")
    assert out.returncode != 0
    time.sleep(1)
    assert mine.is_dir() and [p.name for p in mine.iterdir()] == [".make.lock"]  # a folder it found stays


def test_a_run_that_cannot_be_a_folder_is_one_line_naming_the_file_in_the_way(tmp_path):
    mine = tmp_path / "results.txt"  # RUN= a file of the user's, or a path through one
    mine.write_text("my notes\n")
    for goal in ("corpus", "clean", "help"):
        out = make(goal, f"RUN={mine}", f"PY={sys.executable}")
        assert out.returncode != 0 and f"RUN={mine} is a file, not a run folder" in out.stderr, out.stderr
    out = make("corpus", f"RUN={mine / 'toy'}", f"PY={sys.executable}")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert f"RUN={mine / 'toy'} cannot be the run folder ({mine} is a file, not a folder)" in out.stderr, out.stderr
    for goal in ("clean", "help"):  # nothing there to remove or read
        out = make(goal, f"RUN={mine / 'toy'}", f"PY={sys.executable}")
        assert out.returncode == 0, out.stderr
    assert mine.read_text() == "my notes\n"
