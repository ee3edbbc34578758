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
