"""report.html: written by stage 04 from the run's files, self-contained, and every chart drawn by a real browser."""
import re
import json
import shutil
import subprocess

import numpy as np
import pytest

import report

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium():
    path = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if not path:  # .ci/run installs Debian's chromium, so CI always renders the page
        pytest.skip("no Chromium on this machine: the report was not rendered (apt-get install chromium)")
    return path


def test_the_report_is_one_file_built_from_the_run(made_run):
    page = (made_run / "report.html").read_text()
    assert "<script src" not in page and "http" not in page.replace("http-equiv", "")  # opens offline
    assert "explanations.html" in page and page.count("<svg class='chart'") >= 9
    # the per-class dots are the run's classes: one per class with test images, at its training count
    z = np.load(made_run / "predictions.npz")
    dots = re.findall(r"<title>class (\d+): (\d+) images, (\d+) %</title>", page)
    assert len(dots) == 3 * len(np.unique(z["labels"]))
    for c, n, acc in dots[:len(np.unique(z["labels"]))]:  # the first chart: the classifier alone
        c = int(c)
        assert int(n) == z["class_counts"][c]
        assert int(acc) == round(100 * np.mean(z["pred_coarse"][z["labels"] == c] == c))


def test_every_chart_renders_in_headless_chromium(made_run, tmp_path):
    browser = chromium()
    dom = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'p'}", "--dump-dom",
                          f"file://{made_run / 'report.html'}"], capture_output=True, text=True, timeout=120).stdout
    charts = re.search(r'data-charts="(\d+)" data-rendered="(\d+)"', dom)
    assert charts, dom[-2000:]
    assert int(charts.group(1)) >= 9 and charts.group(1) == charts.group(2)  # every SVG drew something of size


def test_table4_and_the_systems_join_the_report(made_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(made_run, run, ignore=shutil.ignore_patterns("*.pt", "cache", "ablation", "systems"))
    full = json.loads((run / "results.json").read_text())
    for row in ("lp", "vpt", "corpus", "sfm", "desc_ce", "na"):  # every ablation row, made on the same data
        res = json.loads(json.dumps(full))
        res["variants"]["coarse"]["overall"] = 45.5 if row == "lp" else res["variants"]["coarse"]["overall"]
        (run / "ablation" / row).mkdir(parents=True)
        (run / "ablation" / row / "results.json").write_text(json.dumps(res))
    (run / "systems" / "x").mkdir(parents=True)
    (run / "systems" / "x" / "results.json").write_text(json.dumps(
        {"system": "X", "variants": {"x": {"overall": 33.3, "many": 1, "medium": 2, "few": 3}}, "labels": {},
         "meta": full["meta"]}))
    report.write_report(run)
    page = (run / "report.html").read_text()
    zero_shot = full["variants"]["zero_shot"]["overall"]
    assert "Table 4 as a waterfall" in page and f"b) linear probe: 45.50 ({45.5 - zero_shot:+.2f})" in page
    assert "X: x: 33.30" in page
