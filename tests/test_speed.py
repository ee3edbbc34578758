"""The speed paths give the same answers as the plain ones: decoding on the device, persistent loader workers,
pre-drawn randomness, and frozen-tower features encoded once and cached."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import ROOT, load_stage, train_args
from test_distributed import eval_args


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """ImageNet-like files of every kind the loaders meet: RGB JPEGs, a greyscale JPEG, a CMYK JPEG, a PNG."""
    folder = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    lines = []
    for i, (kind, size) in enumerate([("RGB", (500, 375)), ("RGB", (333, 500)), ("L", (400, 300)),
                                      ("CMYK", (300, 260)), ("PNG", (240, 200)), ("RGB", (224, 224))]):
        base = rng.integers(0, 255, (size[1] // 20, size[0] // 20, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize(size, Image.BICUBIC)
        path = folder / f"{i}.{'png' if kind == 'PNG' else 'jpg'}"
        (img if kind in ("RGB", "PNG") else img.convert(kind)).save(path, quality=92)
        lines.append((str(path), i % 3, f"list.txt:{i + 1}"))
    return lines


@pytest.fixture(scope="module")
def transforms():
    import open_clip
    _, train, val = open_clip.create_model_and_transforms("ViT-B-16-quickgelu", pretrained=None)
    return {"train": train, "val": val}


@pytest.mark.parametrize("kind", ["train", "val"])
@pytest.mark.parametrize("decode", ["tensor", "device"])
def test_decode_paths_match_pil(image_files, transforms, kind, decode):
    transform = transforms[kind]
    batches = {}
    for mode in ("pil", decode):
        loader, to_device = common.image_loader(image_files, transform, mode, "cpu", seed=3, batch_size=len(image_files))
        batches[mode] = to_device(next(iter(loader)))
    (a, ya), (b, yb) = batches["pil"], batches[decode]
    assert a.shape == b.shape == (len(image_files), 3, 224, 224) and torch.equal(ya, yb)
    # same crop box (a different box would differ by ~0.5 on average); PIL's and torch's bicubic differ slightly
    diff = (a - b).abs().mean(dim=(1, 2, 3))
    assert diff.max() < 0.01, diff  # measured: 0.0025 on average, one grey level at most


def test_split_transform_refuses_what_it_cannot_move(transforms):
    from torchvision import transforms as T
    jitter = T.Compose([T.ColorJitter(0.4), *transforms["train"].transforms])
    with pytest.raises(ValueError, match="ColorJitter.*--decode pil"):
        common.SplitTransform(jitter)


def test_crops_follow_the_epoch_in_the_key(image_files, transforms):
    data = common.ImageList(image_files, transforms["train"], seed=0)
    assert torch.equal(data[(1, 0)][0], data[(1, 0)][0])
    assert not torch.equal(data[(0, 0)][0], data[(1, 0)][0])


def test_epoch_draws_are_the_one_by_one_draws():
    stage = load_stage("03_train_coarse.py")
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 4])
    corpus = stage.CorpusSampler(labels, 5)
    draws = stage.epoch_draws(3, 4, 6, True, corpus, torch.Generator().manual_seed(7), "cpu")
    gen = torch.Generator().manual_seed(7)
    for i in range(3):
        idx, y = corpus.sample(4, gen)
        perm = torch.randperm(10, generator=gen)
        assert torch.equal(draws["corpus"][i], idx) and torch.equal(draws["corpus_labels"][i], y)
        assert torch.equal(draws["perm"][i], perm)


def test_persistent_workers_train_like_no_workers(made_run, tiny_world, tmp_path):
    stage = load_stage("03_train_coarse.py")
    features = made_run / "text_features.pt"
    torch.set_num_threads(1)  # workers take cores from the model (common.share_cores): the same thread count in both
    for workers in ("0", "2"):
        args = train_args(tiny_world, features, tmp_path / workers / "coarse.pt", "--epochs", "2")
        args[args.index("--workers") + 1] = workers
        stage.main(args)
    a, b = (torch.load(tmp_path / w / "coarse.pt", weights_only=True) for w in ("0", "2"))
    for key in ("prompts", "w_cls", "w_llm"):
        assert torch.equal(a[key], b[key]), key


def test_linear_probe_encodes_once_and_reuses_the_cache(made_run, tiny_world, tmp_path, capsys):
    train, evaluate = load_stage("03_train_coarse.py"), load_stage("04_eval_hlc.py")
    features, cache = made_run / "text_features.pt", tmp_path / "cache"
    lp = ("--epochs", "3", "--prompt-tokens", "0", "--corpus-ratio", "0", "--mixup-alpha", "0")
    for run in ("a", "b"):
        train.main(train_args(tiny_world, features, tmp_path / run / "coarse.pt", *lp, "--feature-cache", str(cache)))
        evaluate.main(eval_args(tiny_world, features, tmp_path / run / "coarse.pt", tmp_path / run / "results.json")
                      + ["--feature-cache", str(cache)])
    out = capsys.readouterr().out
    assert out.count("encoded 47 training images once") == 1 and out.count("training features from") == 1
    assert out.count("image features: plain run over 20 images") == 1  # the first evaluation
    assert out.count("image features: no tower run over 20 images") == 1  # the second: everything cached
    assert out.count("HLC features = plain CLIP") == 2
    assert len(list(cache.iterdir())) == 2  # train and test features
    a, b = (torch.load(tmp_path / r / "coarse.pt", weights_only=True) for r in "ab")
    assert torch.equal(a["w_cls"], b["w_cls"]) and torch.equal(a["w_llm"], b["w_llm"])
    ra, rb = (json.loads((tmp_path / r / "results.json").read_text()) for r in "ab")
    assert ra["variants"] == rb["variants"]

    # the cached features are the tower's own: the zero-shot result matches the main run's, computed afresh
    main = json.loads((made_run / "results.json").read_text())
    assert ra["variants"]["zero_shot"] == main["variants"]["zero_shot"]
    # with augmentation every epoch instead, the tower runs in every epoch and nothing is cached
    train.main(train_args(tiny_world, features, tmp_path / "c" / "coarse.pt", *lp, "--augment-frozen"))
    assert "encoded" not in capsys.readouterr().out


def test_cache_name_changes_with_what_the_features_depend_on(tiny_world, transforms, tmp_path):
    samples = common.read_split(tiny_world, "tiny", "train", 5)
    name = lambda **kw: common.feature_cache_file(tmp_path, "train", kw.get("samples", samples), "tiny-clip",
                                                  kw.get("pretrained", "none"), kw.get("size", 0),
                                                  transforms[kw.get("t", "val")], kw.get("precision", "fp32")).name
    base = name()
    assert base == name() and base.startswith("train-")
    assert len({base, name(samples=samples[:-1]), name(pretrained="openai"), name(size=336), name(t="train"),
                name(precision="bf16")}) == 6
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"1")
    first = name(pretrained=str(weights))
    weights.write_bytes(b"12")
    assert name(pretrained=str(weights)) != first


@pytest.mark.parametrize("decode", ["tensor", "device"])
def test_worker_processes_hand_over_whole_batches(image_files, transforms, decode):
    sampler = common.Batches()
    sampler.batches = [[(0, i) for i in range(len(image_files))], [(1, i) for i in range(3)]]
    got = {}
    for workers in (0, 2):
        loader, to_device = common.image_loader(image_files, transforms["train"], decode, "cpu", seed=0,
                                                workers=workers, batch_sampler=sampler)
        got[workers] = [to_device(b)[0] for b in loader]
    assert [x.shape[0] for x in got[2]] == [len(image_files), 3]
    assert all(torch.equal(a, b) for a, b in zip(got[0], got[2]))


@pytest.mark.slow
def test_compiled_tower_trains_like_eager(made_run, tiny_world, tmp_path):
    stage = load_stage("03_train_coarse.py")
    features = made_run / "text_features.pt"
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        stage.main(train_args(tiny_world, features, tmp_path / name / "coarse.pt", "--epochs", "2", *extra))
    a, b = (torch.load(tmp_path / n / "coarse.pt", weights_only=True) for n in ("eager", "compiled"))
    for key in ("prompts", "w_cls", "w_llm"):
        assert torch.allclose(a[key], b[key], atol=1e-4), (key, (a[key] - b[key]).abs().max())


def test_sample_seed_sets_the_cpu_generator_alone(monkeypatch):
    """A sample's augmentation seed leaves the CPU generator where torch.manual_seed would, without queueing a seed
    (and a stack trace) for each accelerator type on every sample, which halved the toy's training speed."""
    torch.manual_seed(12345)
    want = torch.get_rng_state()
    torch.manual_seed(0)

    def refuse(*_, **__):
        raise AssertionError("an accelerator was seeded for one sample")
    for device in ("cuda", "xpu", "mtia"):
        if hasattr(getattr(torch, device, None), "manual_seed_all"):
            monkeypatch.setattr(getattr(torch, device), "manual_seed_all", refuse)
    common.seed_sample(0, 0, 12345)
    assert torch.equal(torch.get_rng_state(), want)
    common.seed_sample(None, 0, 1)  # no seed: the generator is left alone
    assert torch.equal(torch.get_rng_state(), want)


def test_cpu_loader_workers_leave_the_model_the_other_cores(image_files, monkeypatch):
    """On a CPU device, a loader with fewer workers than cores leaves the model the cores they do not take (never more
    threads than it had); with as many workers as cores or more, the model keeps its threads."""
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(common.os, "cpu_count", lambda: 4)
    torch.set_num_threads(4)  # conftest gives the next test its threads back
    common.image_loader(image_files, lambda im: im, "pil", "cpu", workers=1, batch_size=2)
    assert torch.get_num_threads() == 3
    common.image_loader(image_files, lambda im: im, "pil", "cpu", workers=3, batch_size=2)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    for workers in (0, 4, 8):  # no workers, or the cores all taken by them: the model keeps its threads
        common.image_loader(image_files, lambda im: im, "pil", "cpu", workers=workers, batch_size=2)
        assert torch.get_num_threads() == 2
    common.image_loader(image_files, lambda im: im, "pil", "cpu", workers=1, batch_size=2)
    assert torch.get_num_threads() == 2  # three cores free, but never more threads than it had


def test_more_workers_than_cores_are_said_once_without_torchs_warning(image_files, monkeypatch, capsys):
    """The benchmarks' 8 workers on a 2-core machine were faster (docs/speed.md): torch's warning that they may be slow,
    printed twice a loader, gives way to one note a process."""
    import warnings

    import basics
    monkeypatch.setattr(basics, "_WARNED", set())
    cores = common.available_cores()
    small = lambda im: torch.from_numpy(np.asarray(im.resize((8, 8)))).clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            loader, _ = common.image_loader(image_files, small, "pil", "cpu", workers=cores + 1, batch_size=3)
            next(iter(loader))
    assert not [w for w in caught if "DataLoader will create" in str(w.message)]
    assert capsys.readouterr().err.count(f"{cores + 1} image-loading workers on {cores} cores") == 1


def test_the_scripts_that_need_no_torch_import_none():
    """Stage 01, the tables, the report and the toy's tuner start without torch, torchvision or open_clip (3 to 10 s
    of imports on a 2-core CPU, paid again by every such script `make tables` runs): they use basics.py alone. So
    does stage 04 checking its arguments, which make runs before each training."""
    code = ("import importlib.util, sys\n"
            "for name in ('01_build_corpus.py', 'make_tables.py', 'report.py', 'tune_toy.py', '00_make_toy.py',\n"
            "             '04_eval_hlc.py'):\n"
            "    spec = importlib.util.spec_from_file_location('s' + name[:-3], name)\n"
            "    module = importlib.util.module_from_spec(spec)\n"
            "    spec.loader.exec_module(module)\n"
            "module.main(['--check-args', '--dataset', 'toy', '--data-root', 'd', '--features', 'f', '--coarse', 'c',\n"
            "             '--out', 'r.json', '--decode', 'tensor', '--precision', 'fp32'])\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'open_clip', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow  # 15 s: a fresh interpreter imports timm and torch._dynamo whole
def test_clip_loads_without_torch_dynamo_and_timm_stays_usable(tiny_world, tmp_path):
    """load_clip imports open_clip without torch._dynamo, which torchvision and timm load whole for nothing the kit
    runs (3 s of each stage's start-up on a 2-core CPU). Nothing is lost: torchvision's function that asked for it
    still answers, torch._dynamo when asked for later is the real one (torch.compile traces; backend eager, no C++
    build), and a timm-backed image tower still builds."""
    timm_config = tmp_path / "timm-tiny.json"
    timm_config.write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                                        "timm_pool": "avg", "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    code = ("import sys, torch, common\n"
            f"common.load_clip({str(tiny_world / 'tiny-clip.json')!r}, 'none')\n"
            "print(*(m in sys.modules for m in ('torch._dynamo', 'timm', 'torchvision', 'open_clip')))\n"
            "print(sys.modules['torchvision.ops.roi_align'].is_compile_supported('cpu'))\n"
            "import torch._dynamo.utils\n"
            "f = torch.compile(lambda x: x * 2, backend='eager')\n"
            "print(hasattr(torch._dynamo.utils, 'counters'), int(f(torch.ones(1))))\n"
            f"model = common.load_clip({str(timm_config)!r}, 'none')[0]\n"
            "print(type(model.visual).__name__, tuple(model.encode_image(torch.zeros(1, 3, 224, 224)).shape))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "False", "True", "True", "True", "True", "2", "TimmModel", "(1,", "32)"]
