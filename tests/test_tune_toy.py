"""make tune-toy's cells: reused when the same arguments made them from the same input files, trained again when the
toy world was rebuilt since."""
import json
import os
import subprocess

import tune_toy


def test_a_cell_is_trained_again_after_the_world_is_rebuilt(tmp_path, monkeypatch):
    features, weights = tmp_path / "text_features.pt", tmp_path / "toy-clip.pt"
    features.write_bytes(b"features")
    weights.write_bytes(b"weights")
    runs = []

    def fake_run(cmd, **_):
        runs.append(cmd)
        out = cmd[cmd.index("--out") + 1]
        target = out if out.endswith(".json") else os.path.join(out, "results.json")
        with open(target, "w") as f:
            json.dump({"variants": {"ballad": {"overall": 50.0}}}, f)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(tune_toy.subprocess, "run", fake_run)
    folder = tmp_path / "tune" / "ballad-x1"
    folder.mkdir(parents=True)
    base = ["--features", str(features), "--pretrained", str(weights)]

    def cell():
        return tune_toy.run_cell("ballad", 1.0, folder, base, [], tune_toy.input_stamps([features, weights]))
    cell()
    cell()
    assert len(runs) == 1  # same arguments, same inputs: reused
    weights.write_bytes(b"weights of a rebuilt world")  # same path, same arguments, another file
    cell()
    assert len(runs) == 2
    cell()
    assert len(runs) == 2


def test_a_cell_is_trained_again_after_its_split_or_code_changed(tmp_path, monkeypatch):
    val, code = tmp_path / "val.txt", tmp_path / "ballad.py"
    val.write_text("images/a.png 0\n")
    code.write_text("RECIPES = {'toy': {'lr_scale': 3.0}}\n")
    runs = []

    def fake_run(cmd, **_):
        runs.append(cmd)
        with open(os.path.join(cmd[cmd.index("--out") + 1], "results.json"), "w") as f:
            json.dump({"variants": {"ballad": {"overall": 50.0}}}, f)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(tune_toy.subprocess, "run", fake_run)
    monkeypatch.setattr(tune_toy, "code_of", lambda method: [str(code)])
    folder = tmp_path / "tune" / "ballad-x1"
    folder.mkdir(parents=True)
    cell = lambda: tune_toy.run_cell("ballad", 1.0, folder, [], [], tune_toy.input_stamps([val]))
    cell()
    cell()
    assert len(runs) == 1
    val.write_text("images/b.png 0\n")  # another val split, same size and name
    cell()
    code.write_text("RECIPES = {'toy': {'lr_scale': 10.0}}\n")  # an edited recipe
    cell()
    assert len(runs) == 3 and "--fresh" in runs[-1]  # and a cell left by other arguments starts over


def test_an_interrupted_cell_continues(tmp_path, monkeypatch):
    runs = []

    def killed(cmd, **_):
        runs.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "killed")
    monkeypatch.setattr(tune_toy.subprocess, "run", killed)
    folder = tmp_path / "tune" / "lift-x1"
    folder.mkdir(parents=True)
    try:
        tune_toy.run_cell("lift", 1.0, folder, [], [], [])
    except SystemExit:
        pass

    def fine(cmd, **_):
        runs.append(cmd)
        with open(os.path.join(cmd[cmd.index("--out") + 1], "results.json"), "w") as f:
            json.dump({"variants": {"lift": {"overall": 50.0}}}, f)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(tune_toy.subprocess, "run", fine)
    tune_toy.run_cell("lift", 1.0, folder, [], [], [])
    assert "--fresh" in runs[0] and "--resume" in runs[1]
