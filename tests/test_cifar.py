"""CIFAR-100-LT from a fake CIFAR-100 folder in torchvision's on-disk format (no download): the long-tailed counts of
imbalance ratios 100, 50 and 10 against the closed form, LIFT's choice of images, and the kit's layout."""
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

import common
from conftest import ROOT, load_stage

cifar = load_stage("00_make_cifar100_lt.py")


def fake_cifar(root, train_per_class=30, test_per_class=100):
    """torchvision's cifar-100-python/{train,test,meta}: pickled dicts of uint8 rows, fine labels and names."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), per_class)
        rng.shuffle(labels)
        data = rng.integers(0, 255, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels.tolist(), "coarse_labels": [0] * len(labels)}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"kind_{c}" if c else "aquarium_fish" for c in range(100)]}, f)
    return root


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return fake_cifar(tmp_path_factory.mktemp("cifar"))


def test_the_long_tail_of_each_ratio_is_ldams_closed_form():
    for ratio, total, last in ((100, 10847, 5), (50, 12608, 10), (10, 19573, 50)):
        counts = cifar.long_tail_counts(500, ratio)
        assert sum(counts) == total and counts[0] == 500 and counts[-1] == last, ratio
        assert counts == [int(500 * (1 / ratio) ** (c / 99)) for c in range(100)]
    groups = common.group_counts("cifar100_lt", cifar.long_tail_counts(500, 10))  # LIFT: the ratio-100 groups
    assert common.shot_counts(groups) == {"many": 35, "medium": 35, "few": 30}


@pytest.mark.parametrize("ratio", [100, pytest.param(50, marks=pytest.mark.slow), pytest.param(10, marks=pytest.mark.slow)])
def test_make_data_writes_the_split_of_each_ratio(cifar_root, ratio):
    out = subprocess.run(["make", "-C", str(ROOT), "data", "DATASET=cifar100_lt", f"CIFAR_ROOT={cifar_root}",
                          f"IR={ratio}", f"PY={sys.executable}", f"RUN={cifar_root}/run{ratio}"], capture_output=True,
                         text=True)  # RUN: the params are recorded in the test's own folder
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    root = cifar_root / f"ir{ratio}"
    names = common.class_names("cifar100_lt", root)
    train = common.read_split(root, "cifar100_lt", "train", len(names))
    test = common.read_split(root, "cifar100_lt", "test", len(names))
    assert names[0] == "aquarium fish" and len(test) == 10000
    assert common.class_counts(train, 100).tolist() == cifar.long_tail_counts(30, ratio)
    # LIFT's images: NumPy's global generator seeded 0, one shuffle of each class's indices in class order
    with open(cifar_root / "cifar-100-python" / "train", "rb") as f:
        labels = np.asarray(pickle.load(f)["fine_labels"])
    np.random.seed(0)
    expected = []
    for c, n in enumerate(cifar.long_tail_counts(30, ratio)):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        expected += [f"../images/train/{i:05d}.png" for i in idx[:n]]
    assert [p.split(f"ir{ratio}/")[1] for p, _, _ in train] == expected
    assert json.loads((root / ".complete").read_text())["ir"] == ratio


def test_a_missing_cifar_folder_says_so_without_downloading(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python: CIFAR-100 not found"):
        cifar.main(["--root", str(tmp_path), "--no-download"])
    with pytest.raises(SystemExit, match="--ir must be 1 or more, not 0"):  # before any download
        cifar.main(["--root", str(tmp_path), "--ir", "0"])
    assert not list(tmp_path.iterdir())


def test_a_failed_download_says_where_the_files_go(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    def offline(*args, **kw):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(OSError, match=rf"could not download CIFAR-100 into {tmp_path} .*Name or service not known.*"
                                      rf"cifar-100-python.tar.gz .* in {tmp_path}, .*"
                                      rf"cifar-100-python/ folder .* to {tmp_path}/cifar-100-python, or .*CIFAR_ROOT="):
        cifar.main(["--root", str(tmp_path)])


def test_the_tarball_put_in_the_root_is_unpacked_without_the_network(tmp_path, monkeypatch):
    """What the failed download's message promises: cifar-100-python.tar.gz in the root is checked by MD5 and unpacked
    by torchvision with no network (the fake's digests stand in for the real files')."""
    import hashlib
    import tarfile
    import urllib.request

    import torchvision

    src = fake_cifar(tmp_path / "src", train_per_class=5, test_per_class=1)
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    md5 = lambda path: hashlib.md5(path.read_bytes()).hexdigest()  # noqa: E731
    ds = torchvision.datasets.CIFAR100
    monkeypatch.setattr(ds, "tgz_md5", md5(root / "cifar-100-python.tar.gz"))
    monkeypatch.setattr(ds, "train_list", [["train", md5(src / "cifar-100-python" / "train")]])
    monkeypatch.setattr(ds, "test_list", [["test", md5(src / "cifar-100-python" / "test")]])
    monkeypatch.setattr(ds, "meta", dict(ds.meta, md5=md5(src / "cifar-100-python" / "meta")))

    def offline(*args, **kw):
        raise OSError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cifar.main(["--root", str(root)])
    assert (root / "cifar-100-python" / "meta").exists() and (root / "ir100" / "train.txt").exists()


def test_make_all_on_cifar100_lt_previews_the_chain(cifar_root):
    out = subprocess.run(["make", "-C", str(ROOT), "-n", "all", "DATASET=cifar100_lt", f"CIFAR_ROOT={cifar_root}",
                          "IR=100", f"PY={sys.executable}", f"DESCRIPTORS={cifar_root}/d.json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    for stage in ("01_build_corpus.py", "02_cache_descriptors.py", "03_train_coarse.py", "04_eval_hlc.py"):
        assert stage in out.stdout, stage
    assert f"--data-root {cifar_root}/ir100" in out.stdout and "--dataset cifar100_lt" in out.stdout


@pytest.mark.slow
def test_make_all_runs_on_cifar100_lt(cifar_root, tiny_world, tmp_path):
    names = [f"kind {c}" if c else "aquarium fish" for c in range(100)]
    (tmp_path / "d.json").write_text(json.dumps({n: [f"a {n} in a photo", "something small"] for n in names}))
    out = subprocess.run(["make", "-C", str(ROOT), "all", "DATASET=cifar100_lt", f"CIFAR_ROOT={cifar_root}", "IR=100",
                          f"RUN={tmp_path / 'run'}", f"MODEL={tiny_world}/tiny-clip.json", "PRETRAINED=none",
                          f"DESCRIPTORS={tmp_path / 'd.json'}", "EPOCHS=1", "WORKERS=0", f"PY={sys.executable}",
                          "TRAIN_ARGS=--batch-size 64"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dataset"] == "cifar100_lt" and results["num_test"] == 10000
    assert results["shot_counts"] == common.shot_counts(common.group_counts("cifar100_lt", None))
