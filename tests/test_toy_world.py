"""The toy world through make, twice with the same seed (slow: make test-all only). What is checked is what the toy is
built to show and holds for every seed reported in docs/toy-world.md; the relations that do not hold there are not
asserted here either."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def run_toy(tmp, name):
    data, run = tmp / f"data_{name}", tmp / f"run_{name}"
    out = subprocess.run(["make", "-C", str(ROOT), "all", "DATASET=toy", f"DATA_ROOT={data}", f"RUN={run}",
                          f"PY={sys.executable}"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads((run / "results.json").read_text())


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    return run_toy(tmp, "a"), run_toy(tmp, "b")


def test_toy_world_shot_groups_are_all_present(toy_runs):
    assert toy_runs[0]["shot_counts"] == {"many": 6, "medium": 12, "few": 18}


def test_logit_adjustment_lifts_the_tail(toy_runs):
    v = toy_runs[0]["variants"]
    assert v["coarse_la"]["few"] > v["coarse"]["few"] + 10 and v["coarse_la"]["overall"] > v["coarse"]["overall"]


def test_learned_weights_beat_the_plain_average(toy_runs):
    v = toy_runs[0]["variants"]
    assert v["hlc"]["overall"] > v["hlc_unweighted"]["overall"]


def test_learned_weights_silence_the_non_visual_descriptors_and_put_the_wrong_ones_under_uniform(toy_runs):
    w = toy_runs[0]["descriptor_weights"]
    uniform = 1 / 10  # "well below" (make_tables.RELATIONS): a fifth under; the wrong kind is not, on seeds 0 and 2
    assert w["distractor"] < w["pattern"] and w["nonvisual"] <= 0.8 * uniform and w["wrong"] < uniform, w


def test_descriptors_beat_class_name_prompts_zero_shot(toy_runs):
    v = toy_runs[0]["variants"]
    assert v["descriptors_zero_shot"]["overall"] > v["zero_shot"]["overall"]


def test_training_beats_zero_shot_by_twenty_points(toy_runs):
    v = toy_runs[0]["variants"]
    assert v["coarse_la"]["overall"] > v["zero_shot"]["overall"] + 20


def test_same_seed_same_numbers(toy_runs):
    a, b = toy_runs
    for key in ("variants", "topk_sweep", "tau_sweep", "descriptor_weights", "shot_counts"):
        assert a[key] == b[key], key
