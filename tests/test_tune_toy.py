"""make tune-toy's cells: reused when the same arguments made them from the same input files, trained again when the
toy world was rebuilt since."""
import json
import os
import subprocess

import pytest

import tune_toy


def fake_training(runs, variant, returncode=0):
    """A stand-in for the training subprocess: records its command and, when it succeeds, writes a results.json
    scoring `variant` 50 where --out says (a folder, or the file itself)."""
    def run(cmd, **_):
        runs.append(cmd)
        if returncode == 0:
            out = cmd[cmd.index("--out") + 1]
            target = out if out.endswith(".json") else os.path.join(out, "results.json")
            with open(target, "w") as f:
                json.dump({"variants": {variant: {"overall": 50.0}}}, f)
        return subprocess.CompletedProcess(cmd, returncode, "", "" if returncode == 0 else "killed")
    return run


def test_a_cell_is_trained_again_after_the_world_is_rebuilt(tmp_path, monkeypatch):
    features, weights = tmp_path / "text_features.pt", tmp_path / "toy-clip.safetensors"
    features.write_bytes(b"features")
    weights.write_bytes(b"weights")
    runs = []
    monkeypatch.setattr(tune_toy.subprocess, "run", fake_training(runs, "ballad"))
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
    monkeypatch.setattr(tune_toy.subprocess, "run", fake_training(runs, "ballad"))
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
    monkeypatch.setattr(tune_toy.subprocess, "run", fake_training(runs, "lift", returncode=1))
    folder = tmp_path / "tune" / "lift-x1"
    folder.mkdir(parents=True)
    try:
        tune_toy.run_cell("lift", 1.0, folder, [], [], [])
    except SystemExit:
        pass
    monkeypatch.setattr(tune_toy.subprocess, "run", fake_training(runs, "lift"))
    tune_toy.run_cell("lift", 1.0, folder, [], [], [])
    assert "--fresh" in runs[0] and "--resume" in runs[1]


def test_a_diverged_cell_is_a_result_never_picked(tmp_path, monkeypatch):
    runs = []

    def diverges(cmd, **_):
        runs.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "phase_a: loss is inf in epoch 1; try a lower learning rate")
    monkeypatch.setattr(tune_toy.subprocess, "run", diverges)
    folder = tmp_path / "tune" / "ballad-x10"
    folder.mkdir(parents=True)
    res = tune_toy.run_cell("ballad", 10.0, folder, [], [], [])
    assert res == {"diverged": True} and tune_toy.val_score(res, "ballad") is None
    assert tune_toy.run_cell("ballad", 10.0, folder, [], [], []) == res and len(runs) == 1  # kept, not retried
    monkeypatch.setattr(tune_toy.subprocess, "run", fake_training(runs, "ballad", returncode=1))
    with pytest.raises(SystemExit, match="ballad x3 failed"):  # any other failure stops the tuning
        tune_toy.run_cell("ballad", 3.0, tmp_path / "tune", [], [], [])
