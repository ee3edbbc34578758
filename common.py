"""What two or more HLC stages share: dataset facts and loaders, CLIP loading, the VPT-deep wrapper,
the scoring functions of the method (Eq. 2, 4, Algorithm 1), metrics and atomic I/O.

Nothing here runs on import. Each function is small enough to read in one go.
"""
import contextlib
import difflib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------
# datasets (SPEC section 3)
# ---------------------------------------------------------------------------------------------------

# Per-dataset facts. Any other dataset name uses the generic layout (train.txt, val.txt, test.txt,
# classnames.txt under the data root).
DATASETS = {
    "imagenet_lt": dict(
        num_classes=1000, eval_split="test",
        splits={"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt", "test": "ImageNet_LT_test.txt"},
        lines={"train": 115846, "val": 20000, "test": 50000},
        # the original ImageNet names that VCD's and CuPL's files use where open_clip's list renamed the class;
        # an index, because open_clip's list repeats 'missile' (657, 744) and 'sunglasses' (836, 837)
        name_aliases={"eft": 27, "maillot": 638, "projectile": 744, "sunglass": 836},
        source="the OLTR release (github.com/zhmiao/OpenLongTailRecognition-OLTR, ImageNet_LT_*.txt), "
               "paths relative to the ILSVRC2012 root (train/<wnid>/..., val/<wnid>/...)"),
    "places_lt": dict(
        num_classes=365, eval_split="test",
        splits={"train": "Places_LT_train.txt", "val": "Places_LT_val.txt", "test": "Places_LT_test.txt"},
        lines={"train": 62500, "val": 7300, "test": 36500},
        source="the OLTR release (Places_LT_*.txt), paths relative to the Places365-standard root"),
    "inat2018": dict(
        num_classes=8142, eval_split="val",
        splits={"train": "iNaturalist18_train.txt", "val": "iNaturalist18_val.txt"},
        json={"train": "train2018.json", "val": "val2018.json"},
        lines={"train": 437513, "val": 24426},
        source="the iNaturalist 2018 competition (train2018.json, val2018.json, categories.json) or the "
               "iNaturalist18_{train,val}.txt lists of the LT codebases (e.g. PaCo, RIDE)"),
    "cifar100_lt": dict(
        num_classes=100, eval_split="test",
        splits={"train": "train.txt", "test": "test.txt"},
        lines={"test": 10000},
        # LIFT's trainer groups the classes of every ratio by the ratio-100 counts (500 down to 5, LDAM's profile), so
        # the groups of IR 50 and 10 name the same classes as IR 100's
        group_counts=[int(500 * 0.01 ** (c / 99)) for c in range(100)],
        source="00_make_cifar100_lt.py (make data DATASET=cifar100_lt IR=100), from torchvision's CIFAR-100"),
}
GENERIC_SPLITS = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}


def dataset_info(name):
    """Facts for a known dataset, or the generic layout's."""
    if name in DATASETS:
        return DATASETS[name]
    return dict(num_classes=None, eval_split="test", splits=GENERIC_SPLITS, lines={},
                source="you: one 'relative/path label' per line, next to classnames.txt (one name per line)")


def readable_name(folder):
    """'/b/bakery/shop' -> 'bakery shop'; 'swimming_pool-outdoor' -> 'swimming pool outdoor'."""
    name = re.sub(r"^/[a-z]/", "", folder.strip())
    return re.sub(r"\s+", " ", re.sub(r"[_/\-]", " ", name)).strip()


def read_text(path):
    """A text file as users make them: UTF-8, with or without a byte-order mark (Windows editors add one)."""
    return Path(path).read_text(encoding="utf-8-sig")


def read_json(path, what="JSON file"):
    """JSON from a user's file; a missing file says what it was to be, a syntax error names its line and column."""
    try:
        return json.loads(read_text(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path} is a folder, not a {what}") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}:{e.lineno}:{e.colno}: not valid JSON, in the {what} ({e.msg})") from None


_WARNED = set()


def warn_once(message):
    """Print a warning once per process (a split read by two stages of one test run says it once)."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(message, file=sys.stderr, flush=True)


def open_clip_metadata():
    """open_clip's zero_shot_metadata module (the 80 templates, the ImageNet class names), read without importing
    open_clip, which pulls in torch, torchvision and timm: stage 01 starts in a second instead of six."""
    module = sys.modules.get("open_clip.zero_shot_metadata") or sys.modules.get("_open_clip_metadata")
    if module is None:
        import importlib.util
        package = importlib.util.find_spec("open_clip")
        if package is None:
            raise ModuleNotFoundError("open_clip is not installed (pip install -r requirements.txt)")
        spec = importlib.util.spec_from_file_location(
            "_open_clip_metadata", Path(package.submodule_search_locations[0]) / "zero_shot_metadata.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["_open_clip_metadata"] = module
    return module


def _names_from_lines(path):
    lines = read_text(path).splitlines()
    while lines and not lines[-1].strip():  # trailing blank lines are fine
        lines.pop()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(f"{path}:{lineno}: blank class name (line i names label i - 1; remove the line or "
                             "name the class)")
    return [line.strip() for line in lines]


def class_names(dataset, root):
    """Class names indexed by label. A classnames.txt under the root overrides the defaults."""
    root = Path(root)
    override = root / "classnames.txt"
    if override.exists():
        names = _names_from_lines(override)
    elif dataset == "imagenet_lt":
        names = list(open_clip_metadata().IMAGENET_CLASSNAMES)  # two names repeat: everything is keyed by index
    elif dataset == "places_lt":
        cats = root / "categories_places365.txt"
        if cats.exists():  # '/a/airfield 0' per line
            rows = [ln.rsplit(maxsplit=1) for ln in read_text(cats).splitlines() if ln.strip()]
            names = [readable_name(r[0]) for r in sorted(rows, key=lambda r: int(r[1]))]
        elif (root / "train").is_dir():
            names = [readable_name(d.name) for d in sorted((root / "train").iterdir()) if d.is_dir()]
        else:
            raise FileNotFoundError(f"{root}: need classnames.txt, categories_places365.txt or a train/ folder "
                                    "of class folders to name the Places-LT classes")
    elif dataset == "inat2018":
        cats = root / "categories.json"
        if not cats.exists():
            raise FileNotFoundError(f"{cats}: not found. The names in train2018.json are obfuscated; "
                                    "categories.json comes with the iNaturalist 2018 competition files")
        rows = read_json(cats)
        names = [c["name"] for c in sorted(rows, key=lambda c: c["id"])]
    else:
        raise FileNotFoundError(f"{override}: not found. A dataset in the generic layout needs "
                                "classnames.txt (one class name per line, line i = label i)")
    expected = dataset_info(dataset)["num_classes"]
    if expected is not None and len(names) != expected:
        raise ValueError(f"{dataset}: found {len(names)} class names under {root}, expected {expected}")
    same = {}
    for label, name in enumerate(names):
        same.setdefault(name.lower(), []).append(label)
    repeated = {name: labels for name, labels in same.items() if len(labels) > 1}
    if repeated:
        listed = ", ".join(f"{name!r} ({', '.join(map(str, labels))})" for name, labels in list(repeated.items())[:5])
        known = " (open_clip's ImageNet list repeats these two)" if dataset == "imagenet_lt" else ""
        warn_once(f"warning: {len(repeated)} class names are shared by several classes: {listed}{known}. Everything "
                  "is keyed by class index, but their text prompts are the same, so CLIP cannot tell them apart")
    return names


def _split_path(root, dataset, split):
    info = dataset_info(dataset)
    if split not in info["splits"]:
        raise ValueError(f"{dataset} has no '{split}' split (it has: {', '.join(info['splits'])})")
    return Path(root) / info["splits"][split]


def split_file(root, dataset, split):
    """The file a split is read from (the txt list, or iNaturalist's COCO JSON), or None when neither exists."""
    info = dataset_info(dataset)
    path = _split_path(root, dataset, split)
    if path.exists():
        return path
    if "json" in info and (Path(root) / info["json"][split]).exists():
        return Path(root) / info["json"][split]
    return None


def check_dataset(root, dataset, splits=("train", None)):
    """Stop early, before any slow work, when the data root does not hold this dataset's split files."""
    info = dataset_info(dataset)
    wanted = [s or info["eval_split"] for s in splits]
    missing = [s for s in wanted if split_file(root, dataset, s) is None]
    if missing:
        files = ", ".join(info["splits"][s] for s in missing)
        alt = f" (or {', '.join(info['json'][s] for s in missing)})" if "json" in info else ""
        label = {"imagenet_lt": "ImageNet-LT", "places_lt": "Places-LT", "inat2018": "iNaturalist 2018"}.get(dataset,
                                                                                                         dataset)
        close = difflib.get_close_matches(dataset, [*DATASETS, "toy"], n=1, cutoff=0.7)
        hint = (f" DATASET={dataset} is not a known dataset, so its generic layout was looked for: did you mean "
                f"DATASET={close[0]}?") if close and dataset not in DATASETS else ""
        where = ("CIFAR_ROOT=<the folder holding cifar-100-python> (or that folder as DATA_ROOT)" if dataset == "cifar100_lt"
                 else f"DATA_ROOT=/path/to/{dataset} (the README's Quick start shows each dataset's folder)")
        raise SystemExit(f"DATA_ROOT={root} holds no {label}: {files}{alt} not found there. They come from "
                         f"{info['source']}; pass {where}.{hint}")


def read_split(root, dataset, split, num_classes, check_files=True):
    """Read one split as a list of (image path, label, where), `where` = 'file:line' for error messages.

    OLTR format: 'relative/path label' per line; paths are relative to the data root. iNaturalist
    2018 may instead come as COCO-style JSON (images and annotations paired by id, label = category_id).
    With check_files, every image must exist and be a non-empty file (a zero-byte image stops here, naming its line,
    not hours later in a loader worker).
    """
    info = dataset_info(dataset)
    path = split_file(root, dataset, split)
    if path is None:
        path = _split_path(root, dataset, split)
        wanted = ", ".join(info["splits"].values())
        alt = f" (or {', '.join(info['json'].values())})" if "json" in info else ""
        raise FileNotFoundError(f"{path}: split file not found. {dataset} expects {wanted}{alt} in {root}; "
                                f"they come from {info['source']}")
    samples = _read_coco_split(path, num_classes) if path.suffix == ".json" else _read_txt_split(path, num_classes)
    if not samples:
        raise ValueError(f"{path}: no 'relative/path label' line in it (an empty split)")
    expected = info["lines"].get(split)
    if expected is not None and len(samples) != expected:
        raise ValueError(f"{path}: {len(samples)} entries, but {dataset} '{split}' has {expected}; "
                         "is this the right file for this dataset?")
    seen = {}
    for rel, _, where in samples:
        seen.setdefault(rel, []).append(where)
    repeated = [wheres for wheres in seen.values() if len(wheres) > 1]
    if repeated:
        warn_once(f"warning: {path}: {sum(len(w) - 1 for w in repeated)} lines repeat an image listed before (first: "
                  f"{repeated[0][1]} repeats {repeated[0][0]}); each counts as a sample")
    samples = [(os.path.join(root, rel.lstrip("/")), label, where) for rel, label, where in samples]
    if check_files:
        for p, _, where in samples:
            try:
                size = os.stat(p).st_size
            except FileNotFoundError:
                raise FileNotFoundError(f"{where}: image not found: {p}") from None
            if size == 0:
                raise ValueError(f"{where}: image {p} is an empty (zero-byte) file")
    return samples


LABEL = re.compile(r"-?[0-9]+")  # int() would also take '1_0' (as 10), ' 1' or '١'


def _read_txt_split(path, num_classes):
    samples = []
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark would otherwise stick to line 1's path
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().rsplit(maxsplit=1)
            where = f"{path}:{lineno}"
            if len(parts) != 2:
                raise ValueError(f"{where}: expected 'relative/path label', got {line.strip()!r}")
            if not LABEL.fullmatch(parts[1]):
                raise ValueError(f"{where}: label {parts[1]!r} is not a plain integer")
            label = int(parts[1])
            if not 0 <= label < num_classes:
                raise ValueError(f"{where}: label {label} is outside [0, {num_classes})")
            samples.append((parts[0], label, where))
    return samples


def _read_coco_split(path, num_classes):
    data = read_json(path, "COCO-style JSON file")
    files = {im["id"]: im["file_name"] for im in data["images"]}  # pair by id, never by position
    samples = []
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}:annotations[{i}]"
        if ann["image_id"] not in files:
            raise ValueError(f"{where}: image_id {ann['image_id']} has no entry in 'images'")
        label = ann["category_id"]
        if isinstance(label, bool) or not isinstance(label, int):
            raise ValueError(f"{where}: category_id {label!r} is not an integer")
        if not 0 <= label < num_classes:
            raise ValueError(f"{where}: category_id {label} is outside [0, {num_classes})")
        samples.append((files[ann["image_id"]], label, where))
    return samples


def check_overlap(train, test, test_split):
    """Warn (once) when an image of the training split is also in the evaluation split."""
    both = {p for p, _, _ in train} & {p for p, _, _ in test}
    if both:
        warn_once(f"warning: {len(both)} images are in both the training split and the '{test_split}' split (e.g. "
                  f"{sorted(both)[0]}); their accuracy is not a test of generalisation")


def check_eval_split(root, dataset, split, num_classes, train):
    """Before a long training: the evaluation split reads (labels, existing non-empty images), and overlaps are said."""
    split = split or dataset_info(dataset)["eval_split"]
    test = read_split(root, dataset, split, num_classes)
    check_overlap(train, test, split)
    return test


def open_rgb(path):
    """An image file as 8-bit RGB (PIL). 16-bit greyscale PNGs (PIL modes I;16 and I) are scaled to 8 bits, not
    clipped to white as Image.convert would; float images are refused."""
    from PIL import Image
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            scale = 257.0 if im.mode.startswith("I;16") or np.asarray(im).max() > 255 else 1.0
            grey = np.clip(np.asarray(im, dtype=np.float64) / scale + 0.5, 0, 255).astype(np.uint8)
            return Image.fromarray(grey, "L").convert("RGB")
        if im.mode == "F":
            raise ValueError("32-bit float image (PIL mode F): convert it to 8-bit first")
        return im.convert("RGB")


def seed_sample(seed, epoch, i):
    """Seed the global CPU generator, the one the transforms draw from, for sample i of epoch e (with seed=None: leave
    it alone). torch.manual_seed would also queue a seed for every accelerator type, capturing a stack trace each
    time: the toy's training ran at 340 images/s with it on 2 cores, at 600 without."""
    if seed is not None:
        torch.default_generator.manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + i)


class ImageList(torch.utils.data.Dataset):
    """(image, label) from read_split's list; an unreadable image names its split file and line.

    With `seed`, sample i's random augmentation in epoch e depends on (seed, e, i) alone, whichever process or
    worker loads it: N processes then see exactly the crops one process would. A key may be i (epoch: the
    attribute) or (epoch, i), which lets persistent workers follow the epochs.
    """

    def __init__(self, samples, transform, seed=None):
        self.samples, self.transform, self.seed, self.epoch = samples, transform, seed, 0

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        path, label, where = self.samples[i]
        try:
            image = open_rgb(path)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: name its split line
            raise ValueError(f"{where}: cannot read image {path}: {e}") from None
        seed_sample(self.seed, epoch, i)
        return self.transform(image), label


# ---- --decode tensor | device: the loader workers hand over uint8 images (or JPEG bytes) and a crop box; the
#      crop, the bicubic resize and the normalisation run on a whole batch where the model runs ----

DECODE_MODES = {
    "pil": "PIL decodes and open_clip's transform runs in the loader workers (float images cross over)",
    "tensor": "libjpeg-turbo (torchvision) decodes in the workers; crop, resize, normalise on the device",
    "device": "the workers read JPEG bytes; decoding (nvJPEG on CUDA), crop, resize, normalise on the device",
}


class SplitTransform:
    """open_clip's train or eval transform cut in two: the random choice of crop, made in the worker from the
    image's header, and the arithmetic, done by __call__ on decoded uint8 images where the model runs."""

    def __init__(self, transform):
        from torchvision import transforms as T
        self.kind, self.mean, self.std, self._stats = None, None, None, {}
        for t in transform.transforms:
            if isinstance(t, T.RandomResizedCrop):
                self.kind, self.crop = "train", t
                self.size, self.interpolation = list(t.size), t.interpolation
            elif isinstance(t, T.Resize) and self.kind is None:
                self.kind, self.size, self.interpolation = "eval", t.size, t.interpolation
            elif isinstance(t, T.CenterCrop) and self.kind == "eval":
                self.center = list(t.size)
            elif isinstance(t, T.Normalize):
                self.mean, self.std = t.mean, t.std
            elif type(t).__name__ not in ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "function"):
                raise ValueError(f"--decode tensor/device cannot move {t!r} of the image transform to the device; "
                                 f"use --decode pil")
        if self.kind is None or self.mean is None:
            raise ValueError(f"--decode tensor/device needs a RandomResizedCrop or Resize+CenterCrop transform with "
                             f"Normalize; got {transform!r}; use --decode pil")

    def box(self, image):
        """(top, left, height, width) of the region to keep; `image` needs only its size (header read)."""
        if self.kind == "train":
            return self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        return 0, 0, image.size[1], image.size[0]

    def __call__(self, images, boxes):
        """uint8 (3, H, W) images on one device, boxes (B, 4) on the CPU -> normalised float (B, 3, S, S)."""
        from torchvision.transforms import functional as TF
        out = []
        for image, (top, left, height, width) in zip(images, boxes.tolist()):
            if self.kind == "train":
                image = TF.resized_crop(image, top, left, height, width, self.size, self.interpolation, antialias=True)
            else:
                image = TF.center_crop(TF.resize(image, self.size, self.interpolation, antialias=True), self.center)
            out.append(image)
        x = torch.stack(out).float().div_(255)
        key = str(x.device)
        if key not in self._stats:  # made once per device: a copy from Python lists waits for the device
            self._stats[key] = [torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (self.mean, self.std)]
        mean, std = self._stats[key]
        return x.sub_(mean).div_(std)


class EncodedImageList(ImageList):
    """--decode tensor|device: (uint8 image or JPEG bytes, is-bytes flag, crop box, label). Files that are not
    RGB or greyscale JPEGs (PNG, CMYK JPEG) are decoded by PIL here whatever the mode."""

    def __init__(self, samples, split_transform, mode, seed=None):
        super().__init__(samples, split_transform, seed)
        self.mode = mode

    def __getitem__(self, key):
        from PIL import Image
        from torchvision import io as tvio
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        path, label, where = self.samples[i]
        try:
            with Image.open(path) as im:  # reads the header only
                jpeg = im.format == "JPEG" and im.mode in ("RGB", "L")
                seed_sample(self.seed, epoch, i)
                box = self.transform.box(im)
            if jpeg:
                data = tvio.read_file(str(path))
                if self.mode == "tensor":
                    data = tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB)
            else:
                data = torch.from_numpy(np.asarray(open_rgb(path)).copy()).permute(2, 0, 1)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{where}: cannot read image {path}: {e}") from None
        return data, jpeg and self.mode == "device", box, label


def collate_encoded(batch):
    """One flat uint8 buffer per batch (one shared-memory block from the worker, one copy to the device), plus
    each item's length and shape (0, 0, 0 for JPEG bytes), flag, box and label."""
    data, encoded, boxes, labels = zip(*batch)
    shapes = [(0, 0, 0) if e else tuple(d.shape) for d, e in zip(data, encoded)]
    return (torch.cat([d.reshape(-1) for d in data]), torch.tensor([d.numel() for d in data]), torch.tensor(shapes),
            torch.tensor(encoded), torch.tensor(boxes), torch.tensor(labels))


class Batches(torch.utils.data.Sampler):
    """A batch sampler whose batches the training loop sets before each epoch, as lists of (epoch, index):
    one DataLoader, and its persistent workers, then serve every epoch."""

    def __init__(self):
        self.batches = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def share_cores(workers):
    """On a CPU device with fewer loader workers than cores, the model keeps the cores the workers leave (never more
    threads than it had). On 2 cores, one worker and one model thread trained the toy at 890 images/s, where two model
    threads next to a worker ran at 530 and two threads with no worker at 665. With as many workers as cores or more,
    the model keeps its threads: `make bench` (a heavier model, large JPEGs) ran its JPEG training at 58 to 109
    images/s with 2 workers and one model thread, at 92 to 160 with 2 workers and two threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers < cores:
        torch.set_num_threads(min(torch.get_num_threads(), cores - workers))


def image_loader(samples, transform, decode, device, seed=None, workers=0, batch_size=None, batch_sampler=None):
    """(DataLoader, to_device): to_device(batch) -> (normalised images, labels) on `device`. `decode` is one of
    DECODE_MODES; 'pil' is the plain path, the others move the crop and resize (and for 'device' the JPEG
    decoding) to the device. On a CPU device, workers may lower the process's torch threads (share_cores)."""
    kind = torch.device(device).type
    cuda = kind == "cuda"
    if kind == "cpu" and workers:
        share_cores(workers)
    options = dict(num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0 and batch_sampler is not None,
                   prefetch_factor=4 if workers else None)
    if batch_sampler is not None:
        options["batch_sampler"] = batch_sampler
    else:
        options["batch_size"] = batch_size
    if decode == "pil":
        loader = torch.utils.data.DataLoader(ImageList(samples, transform, seed), **options)
        return loader, lambda b: (b[0].to(device, non_blocking=True), b[1].to(device, non_blocking=True))
    if decode not in DECODE_MODES:
        raise ValueError(f"--decode {decode!r}: choose one of {', '.join(DECODE_MODES)}")
    split = SplitTransform(transform)
    dataset = EncodedImageList(samples, split, decode, seed)
    loader = torch.utils.data.DataLoader(dataset, collate_fn=collate_encoded, **options)

    def to_device(batch):
        from torchvision import io as tvio
        buf, sizes, shapes, encoded, boxes, labels = batch
        ends = sizes.cumsum(0).tolist()
        items = [(end - n, end, shape, e) for end, n, shape, e in zip(ends, sizes.tolist(), shapes.tolist(),
                                                                         encoded.tolist())]
        on_device = buf.to(device, non_blocking=True) if not all(encoded.tolist()) else None
        images = [None if e else on_device[a:b].view(shape) for a, b, shape, e in items]
        jpegs = [buf[a:b] for a, b, _, e in items if e]  # decoders read from host memory
        if jpegs:
            decoded = iter(tvio.decode_jpeg(jpegs, mode=tvio.ImageReadMode.RGB, device=device))
            images = [image if image is not None else next(decoded) for image in images]
        return split(images, boxes), labels.to(device, non_blocking=True)

    return loader, to_device


def feature_cache_file(cache_dir, split, samples, model, pretrained, image_size, transform, precision="fp32"):
    """Where the frozen tower's features of one split are cached: the name hashes everything they depend on (the
    model: the stages pass model_fingerprint, the content of its config and weights files, so an edited config JSON is
    encoded again; the image size, the transform, the precision the tower ran in (effective_precision), and the
    images: each one's path, label, size and modification time, so an image replaced under the same name is encoded
    again)."""
    import hashlib
    stat = lambda f: [os.stat(f).st_size, os.stat(f).st_mtime_ns] if f and Path(f).is_file() else None
    images = hashlib.sha1()
    for p, y, _ in samples:
        st = os.stat(p)
        images.update(f"{p} {y} {st.st_size} {st.st_mtime_ns}\n".encode())
    key = dict(model=model, model_file=stat(model), pretrained=pretrained, weights_file=stat(pretrained),
               image_size=image_size or None, transform=repr(transform), n=len(samples), images=images.hexdigest())
    if precision != "fp32":  # fp32 caches keep the names they had before precision was part of the key
        key["precision"] = precision
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{split}-{digest}.pt"


def load_cached_features(path, rows):
    """Features from a cache file, or None when there is none, or when it is unreadable or of the wrong length (a
    killed write, a full disk): that file is deleted and the features are encoded again."""
    if not path.exists():
        return None
    try:
        feats = torch.load(path, weights_only=True)
        if isinstance(feats, torch.Tensor) and len(feats) == rows:
            return feats
        problem = f"holds {type(feats).__name__} of length {len(feats) if hasattr(feats, '__len__') else '?'}"
    except Exception as e:  # noqa: BLE001 - any unreadable file is rebuilt
        problem = f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    print(f"note: feature cache {path} {problem}; encoding again", file=sys.stderr)
    path.unlink(missing_ok=True)
    return None


@torch.no_grad()
def encode_split(towers, samples, transform, device, rank=0, world=1, batch_size=256, workers=0, decode="pil",
                 desc="encode", normalize=True, precision="auto"):
    """{name: float32 outputs (N, ...)} of every image for each tower of `towers` ({name: module}), L2-normalised
    along the last dimension unless normalize=False, all from one decoding pass, on the CPU of every process: each
    process encodes a contiguous shard, then the shards are gathered in order."""
    shard = np.array_split(np.arange(len(samples)), world)[rank]
    loader, to_device = image_loader([samples[i] for i in shard], transform, decode, device, workers=workers,
                                     batch_size=batch_size)
    parts = {name: [] for name in towers}
    for batch in ((progress(loader, desc) if rank == 0 else loader) if towers else []):
        images, _ = to_device(batch)
        with image_autocast(device, precision):
            for name, tower in towers.items():
                out = tower(images).float()
                parts[name].append(F.normalize(out, dim=-1) if normalize else out)  # copied back once, at the end
    feats = {name: torch.cat(p).cpu() for name, p in parts.items() if p}
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, feats)
        feats = {name: torch.cat([g[name] for g in gathered if name in g]) for name in towers}
    return feats


def class_counts(samples, num_classes):
    return np.bincount([s[1] for s in samples], minlength=num_classes)


# ---------------------------------------------------------------------------------------------------
# CLIP (SPEC section 5)
# ---------------------------------------------------------------------------------------------------

def resolve_model_name(model):
    """An open_clip model name, or a path to a model-config JSON (registered, named by its stem)."""
    import open_clip
    if model.endswith(".json"):
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(f"{path}: model config not found")
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models(), n=5)
        raise ValueError(f"unknown open_clip model {model!r}; close names: {', '.join(close)}")
    return model


def load_clip(model, pretrained, device="cpu", image_size=None):
    """Frozen open_clip model in eval mode, plus its train and eval transforms and resolved name.

    `pretrained`: a hub tag ('openai'), a local checkpoint file, or 'none' for random weights. `image_size`
    other than the model's builds it at that size; open_clip interpolates the pretrained positional embedding.
    """
    import open_clip
    name = resolve_model_name(model)
    tag = None if pretrained in (None, "", "none") else pretrained
    if tag and not Path(tag).is_file():
        if Path(tag).suffix in (".pt", ".pth", ".bin", ".safetensors") or os.sep in tag:
            raise FileNotFoundError(f"PRETRAINED={tag}: weights file not found")
        tags = open_clip.list_pretrained_tags_by_model(name)
        if tag not in tags:
            raise ValueError(f"PRETRAINED={tag} is neither a file nor a weights tag of {name} (its tags: "
                             f"{', '.join(tags) or 'none'}; or 'none' for random weights)")
    if tag == "openai" and "quickgelu" not in name.lower() and name.startswith("ViT"):
        print(f"warning: OpenAI weights were trained with QuickGELU; {name} builds GELU and loses accuracy "
              f"(open_clip issues #1109, #771). Use {name}-quickgelu.", file=sys.stderr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights ('none') are then the same model in every stage and process
        try:
            model_, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name, pretrained=tag, device=device, force_image_size=image_size or None)
        except RuntimeError as e:
            if not str(e).startswith("Failed to download weights"):
                raise
            cause = str(e).split(": ", 1)[-1].split(". ")[0]  # open_clip's sentence, without the hub's advice
            raise OSError(f"PRETRAINED={tag}: the weights of {name} could not be downloaded ({cause}). On a machine "
                          "without internet, run the same command once where there is, which fills open_clip's "
                          "download cache (HF_HOME, ~/.cache/huggingface), then copy that cache over; or give the "
                          "weights file itself: PRETRAINED=/path/to/open_clip_pytorch_model.bin") from None
    model_.eval().requires_grad_(False)
    return model_, preprocess_train, preprocess_val, name


def drop_text_tower(model):
    """Remove the text encoder from a loaded CLIP: past stage 02 only cached text features are used."""
    for name in ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection", "text"):
        if hasattr(model, name):
            delattr(model, name)
    return model


def count_parameters(module):
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total, trainable


PRECISIONS = {
    "auto": "bf16 autocast on CUDA, float32 elsewhere",
    "fp32": "float32 everywhere (on CUDA: slower, and the image features are not rounded)",
    "bf16": "bf16 autocast on any device (on a CPU: to measure what bf16 changes)",
}


def effective_precision(device, precision="auto"):
    """What the image tower computes in: "bf16" on CUDA under auto, or when asked; "fp32" otherwise."""
    return "bf16" if precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda") else "fp32"


def image_autocast(device, precision="auto"):
    """bf16 autocast for the image tower on CUDA (precision auto); fp32 turns it off, bf16 turns it on anywhere."""
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=effective_precision(device, precision) == "bf16")


def pick_device(name="auto"):
    """'auto' (CUDA when there is one, else the CPU) or a device torch knows that this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} (DEVICE={name}): not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} (DEVICE={name}): this machine has no CUDA device torch can use (no "
                             f"NVIDIA driver, or a torch built without CUDA); use DEVICE=cpu or DEVICE=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name} (DEVICE={name}): this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), numbered from 0")
    return device


def apply_recipe(args, recipes):
    """Fill every argument left at None with the value of this dataset's recipe: recipes["default"] (a method's own
    settings on its main benchmark) overridden by recipes[args.dataset] where there is one. A flag given on the
    command line always wins, one value at a time. Returns the recipe's name (kept in args.recipe)."""
    name = args.dataset if args.dataset in recipes else "default"
    values = {**recipes["default"], **recipes.get(name, {})}
    for key, value in values.items():
        if not hasattr(args, key):
            raise ValueError(f"recipe {name!r} sets {key!r}, which is no flag of this script")
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.recipe = name
    return name


def recipe_help(recipes, key, what=""):
    """'what (default 5e-4; toy 0.005)': a flag's value in each recipe, for --help."""
    default = recipes["default"].get(key)
    others = [f"{name} {r[key]:g}" if isinstance(r[key], float) else f"{name} {r[key]}"
              for name, r in recipes.items() if name != "default" and key in r and r[key] != default]
    shown = f"{default:g}" if isinstance(default, float) else str(default)
    return f"{what} (recipe: {shown}{'; ' + ', '.join(others) if others else ''})".strip()


def refuse_out_of_range(args, least=(), above=()):
    """Stop, naming the flag and its value, when a number is out of range: `least` holds (flag, smallest allowed
    value) pairs, `above` (flag, value it must exceed); a flag this script lacks, or left unset, is skipped. Call it
    after apply_recipe, so that a recipe's values pass the same check. NaN is out of every range."""
    for pairs, fits, words in ((least, lambda v, b: v >= b, "{} or more"), (above, lambda v, b: v > b, "more than {}")):
        for flag, bound in pairs:
            value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
            if value is not None and not fits(value, bound):
                raise SystemExit(f"error: {flag} must be {words.format(bound)}, not {value}")


def progress(iterable, desc, total=None):
    """tqdm's bar in a terminal; in a log file (not a terminal), a line at most every 30 s or 10 %, with rate and ETA,
    instead of carriage-return updates."""
    from tqdm import tqdm
    if sys.stderr.isatty():
        yield from tqdm(iterable, desc=desc, total=total, leave=False)
        return
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    start = last = time.time()
    shown = 0
    for i, item in enumerate(iterable, 1):
        yield item
        now = time.time()
        if total and (now - last >= 30 or i - shown >= total / 10) and i < total:
            rate = i / max(now - start, 1e-9)
            print(f"{desc}: {i}/{total} ({100 * i / total:.0f} %), {rate:.1f}/s, eta {(total - i) / rate:.0f} s",
                  file=sys.stderr, flush=True)
            last, shown = now, i


class PromptedVisual(nn.Module):
    """VPT-deep (paper Eq. 3) around a frozen open_clip VisionTransformer.

    Layer i < depth sees `num_tokens` learnable prompts spliced in after CLS (layer 0 inserts them,
    later layers overwrite the previous layer's prompt outputs); layers from `depth` on run without
    them. With num_tokens = 0 this is exactly `visual(images)`.
    """

    def __init__(self, visual, num_tokens=20, depth=12):
        super().__init__()
        self.visual = visual
        blocks = visual.transformer.resblocks
        if not getattr(visual.transformer, "batch_first", True):
            raise ValueError("PromptedVisual needs a batch-first open_clip VisionTransformer (open_clip >= 3)")
        self.num_tokens, self.depth = num_tokens, min(depth, len(blocks)) if num_tokens else 0
        width = visual.conv1.out_channels
        patch = visual.conv1.kernel_size[0]
        bound = math.sqrt(6.0 / (3 * patch * patch + width))  # VPT's init: +-0.0625 for ViT-B/16
        self.prompts = nn.Parameter(torch.empty(self.depth, num_tokens, width).uniform_(-bound, bound))
        self.grad_checkpointing = False

    def train(self, mode=True):
        super().train(mode)
        self.visual.eval()  # frozen backbone stays in eval mode (no dropout, fixed norms)
        return self

    def forward(self, images):
        v, n = self.visual, self.num_tokens
        x = v._embeds(images)  # (B, 1 + P, width), CLS first
        for i, block in enumerate(v.transformer.resblocks):
            if i < self.depth:
                prompts = self.prompts[i].to(x.dtype).expand(x.shape[0], -1, -1)
                rest = x[:, 1:] if i == 0 else x[:, 1 + n:]
                x = torch.cat([x[:, :1], prompts, rest], dim=1)  # (B, 1 + N + P, width)
            elif i == self.depth and n:
                x = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if self.depth == len(v.transformer.resblocks) and n:
            x = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)
        pooled, _ = v._pool(x)
        return pooled @ v.proj if v.proj is not None else pooled


def init_distributed(device_arg="auto"):
    """(rank, world size, device). Under torchrun: one process per GPU (NCCL), or CPU processes (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, pick_device(device_arg)
    import torch.distributed as dist
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available() and device_arg in ("auto", "cuda"):
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), world, device


def finish_distributed():
    """Leave the process group together: every process waits for the others, then the group is destroyed, so no
    process tears down its sockets while another still talks to it."""
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()


def exit_process(code=0):
    """End a torchrun worker whose work is done and written, without the interpreter's teardown: a gloo work object
    still holding tensors can abort the process there (SIGABRT, "terminate called without an active exception"),
    after its files were written, and make would then delete them."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class GatherRows(torch.autograd.Function):
    """all_gather along dim 0 with a gradient. Every process computes the same loss on the gathered batch, so
    its own rows' gradient is complete on each process; it is scaled by the world size because DDP then
    averages parameter gradients over processes, and the prompts' gradient must be their sum."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows, ctx.world = dist.get_rank(), x.shape[0], len(parts)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows] * ctx.world


def gather_rows(x, world):
    return x if world == 1 else GatherRows.apply(x)


# ---------------------------------------------------------------------------------------------------
# the method's arithmetic
# ---------------------------------------------------------------------------------------------------

def cosine_logits(features, weights, scale):
    """Eq. 1: scale * cos(W_cls, v). features (B, d), weights (C, d) -> (B, C)."""
    return scale * F.normalize(features, dim=-1) @ F.normalize(weights, dim=-1).T


def mixup(features, targets, lam, perm):
    """Eq. 2, shared-space mixup: mix features (B, d) and soft targets (B, C) with a shuffled copy."""
    return lam * features + (1 - lam) * features[perm], lam * targets + (1 - lam) * targets[perm]


def soft_cross_entropy(logits, targets):
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def descriptor_weights(w_llm, mask):
    """softmax over each class's descriptors (C, M); padded slots (mask False) get weight 0."""
    return torch.softmax(w_llm.masked_fill(~mask, float("-inf")), dim=-1)


def descriptor_scores(features, desc_feats, mask, w_llm=None):
    """Algorithm 1's re-ranking score for every class: sum_m softmax(W_llm[c])_m * cos(v, D[c, m]).

    features (B, d), desc_feats (C, M, d) normalised, mask (C, M) bool, w_llm (C, M) or None for the
    plain average. Algorithm 1 prints a mean over M, i.e. this sum / M: the same argmax whenever every
    class has M descriptors, and a proper weighted average when some have fewer. Because cosines are
    linear in v, the weighted sum collapses into one prototype per class: (B, d) @ (d, C).
    """
    if w_llm is None:
        w_llm = torch.zeros(mask.shape, device=desc_feats.device)
    w = descriptor_weights(w_llm, mask)  # (C, M)
    prototypes = (w.unsqueeze(-1) * desc_feats).sum(1)  # (C, d)
    return F.normalize(features, dim=-1) @ prototypes.T


def logit_adjust(logits, prior, tau=1.0):
    """Eq. 4, post-hoc logit adjustment: z - tau * log(pi). Works on torch tensors and numpy arrays."""
    if isinstance(logits, np.ndarray):
        return logits - tau * np.log(prior)
    return logits - tau * torch.log(prior)


def class_prior(counts):
    """pi_c = n_c / sum n (float64). A class with no training image counts as one, so log(pi) stays finite."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1)
    return counts / counts.sum()


def top_candidates(adjusted, k):
    """(B, k) the top-k classes of each row, best first; equal values go to the lower class index (a stable sort, so
    the result is the same on every machine and equals numpy's argsort(-x, kind="stable"))."""
    return torch.sort(adjusted, dim=1, descending=True, stable=True).indices[:, :min(k, adjusted.shape[1])]


def rerank(adjusted, scores, k):
    """Algorithm 1's last step on torch tensors (B, C): the top-k classes by adjusted logit are the candidates, and
    the candidate with the highest descriptor score wins (a tie goes to the better-ranked candidate). k >= C
    re-ranks over every class."""
    cand = top_candidates(adjusted, k)  # (B, k), best first
    return cand.gather(1, scores.gather(1, cand).argmax(1, keepdim=True)).squeeze(1)


def cap_batch(batch_size, n, multiple=1, what="--batch-size"):
    """A batch no larger than the training set (a multiple of `multiple`), saying so when it had to shrink."""
    if batch_size <= n:
        return batch_size
    if n < multiple:
        raise ValueError(f"the training set has {n} images, fewer than the {multiple} processes x micro-batches")
    capped = n // multiple * multiple
    print(f"note: {what} {batch_size} is larger than the training set ({n} images); using {capped}", flush=True)
    return capped


def lr_at(step, total, warmup, base_lr):
    """Linear warm-up, then cosine decay to zero (HLC: cosine decay from 5e-4; the compared systems likewise)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * base_lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ---------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------

SHOT_RULES = {
    # LIFT, LPT, Imbalance-VLM: many n > 100, medium 20 <= n <= 100, few n < 20
    "lift": lambda n: np.where(n > 100, 0, np.where(n >= 20, 1, 2)),
    # VL-LTR and current OLTR code: many n >= 100, few n <= 20
    "vl-ltr": lambda n: np.where(n >= 100, 0, np.where(n > 20, 1, 2)),
}
GROUPS = ("many", "medium", "few")


def shot_groups(counts, rule="lift"):
    """Group index per class: 0 many, 1 medium, 2 few."""
    return SHOT_RULES[rule](np.asarray(counts))


def group_counts(dataset, counts):
    """The counts that define a dataset's shot groups: its training counts, except where the dataset fixes them
    (CIFAR-100-LT: the ratio-100 profile at every ratio, as LIFT)."""
    fixed = dataset_info(dataset).get("group_counts")
    return np.asarray(fixed if fixed is not None else counts)


def accuracy_report(preds, labels, counts, rule="lift"):
    """{overall, many, medium, few} in percent. Overall is plain top-1; a group's accuracy is the mean
    of its classes' accuracies (classes without test images are left out; an empty group is None)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    num_classes = len(counts)
    correct = np.bincount(labels, weights=(preds == labels), minlength=num_classes)
    seen = np.bincount(labels, minlength=num_classes)
    per_class = np.divide(correct, seen, out=np.zeros(num_classes), where=seen > 0)
    groups = shot_groups(counts, rule)
    report = {"overall": round(100.0 * float((preds == labels).mean()), 2)}
    for g, name in enumerate(GROUPS):
        members = (groups == g) & (seen > 0)
        report[name] = round(100.0 * float(per_class[members].mean()), 2) if members.any() else None
    return report


def shot_counts(counts, rule="lift"):
    groups = shot_groups(counts, rule)
    return {name: int((groups == g).sum()) for g, name in enumerate(GROUPS)}



def run_script(main):
    """A script's entry point: bad input (a missing or unreadable file, a value the kit refuses, a full disk) ends
    with its message on one line and exit status 1 instead of a traceback; HLC_TRACEBACK=1 shows the traceback."""
    try:
        main()
    except (OSError, ValueError) as e:
        if os.environ.get("HLC_TRACEBACK"):
            raise
        message = str(e)
        if "Original Traceback" in message:  # raised in a loader worker: its own message is the last line
            message = message.strip().splitlines()[-1].split(": ", 1)[-1]
        print(f"{Path(sys.argv[0]).name}: error: {message}  (HLC_TRACEBACK=1 shows where)", file=sys.stderr, flush=True)
        sys.exit(1)


# ---------------------------------------------------------------------------------------------------
# files: atomic writes and meta
# ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary file next to `path` to write to; on success it replaces `path` in one step, so no reader sees
    half a file. The temporary name is this writer's own (process and a random part), so two writers of one file
    (two runs sharing a feature cache) never write into each other's. On any failure the temporary file is removed,
    and the error says how much room the disk had left."""
    import secrets
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save on a full disk raises RuntimeError("unexpected pos")
            raise OSError(f"could not write {path}: {shutil.disk_usage(path.parent).free} bytes free ({e})") from None
        raise


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def atomic_torch_save(obj, path):
    """torch.save, atomically. Written through a file handle, so that the archive's inner folder is "archive" and not
    the temporary file's random name: the same object gives the same bytes (and digest) every time."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def atomic_savez(path, **arrays):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def write_if_changed(path, data):
    """Write bytes (or text, as UTF-8) atomically, unless the file already holds exactly them: a stage run again leaves
    unchanged files, and their times, alone, so make does not see everything downstream as stale. True when written."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    path = Path(path)
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return True


KIT_MARKER = ".made-by-hlc-kit"  # in every folder a stage 00 script made: only such a folder is ever rewritten


def claim_folder(folder, maker, legacy=()):
    """Make `folder` (with KIT_MARKER in it) for `maker` to write into, or accept one that holds the marker (or, from
    an older kit, every file of `legacy`). Any other folder that is not empty is refused: stage 00 never writes into,
    and never deletes from, data it did not make."""
    folder = Path(folder)
    marker = folder / KIT_MARKER
    if marker.exists() or (legacy and all((folder / f).exists() for f in legacy)):
        write_if_changed(marker, f"{maker}\n")
        return folder
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise SystemExit(f"{folder} exists and was not made by {maker} (no {KIT_MARKER} in it), so {maker} will not "
                         f"write into it or delete anything from it. If it holds your own dataset, name it with "
                         f"DATASET=<its name> (DATASET=toy builds a toy world); otherwise choose an empty or new folder")
    folder.mkdir(parents=True, exist_ok=True)
    write_if_changed(marker, f"{maker}\n")
    return folder


def append_line(path, line):
    """Append one line (a log record) and flush it to disk; a full disk is reported like an atomic write."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(f"could not write {path}: {shutil.disk_usage(Path(path).parent).free} bytes free ({e})") from None


def load_checkpoint(path, what, mmap=False):
    """torch.load(weights_only=True) with a clear message when the file is missing. With mmap the tensors are read
    from disk only when used (stage 04 never touches the corpus features of text_features.pt)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; it is written by {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - a truncated, empty or foreign file: say which and what to do
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {first}); it is truncated, empty or not a file "
                         f"of the kit. Delete it and run {what} again (make does, once the file is gone)") from None


_HELD_LOCKS = {}


def hold_run_lock(directory, what):
    """Take an exclusive lock on DIRECTORY/.lock for the rest of this process (the OS releases it at exit, kill -9
    included): a second run writing to the same RUN stops at once and names the holder, where two trainings would
    otherwise interleave log.jsonl and overwrite each other's checkpoints. Re-taking it in the same process is a no-op."""
    import fcntl
    import socket
    import time as _time
    directory = Path(directory).resolve()
    if directory in _HELD_LOCKS:
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".lock"
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise SystemExit(f"{directory} is in use by {holder}; wait for that run to finish, or give this one another "
                         f"RUN=... (lock file {path})") from None
    f.seek(0)
    f.truncate()
    f.write(f"{what} (pid {os.getpid()} on {socket.gethostname()}, since {_time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    f.flush()
    _HELD_LOCKS[directory] = f


def release_run_locks():
    """Let go of every lock this process holds (the tests call the stages' main() many times in one process)."""
    while _HELD_LOCKS:
        _HELD_LOCKS.popitem()[1].close()


# ---- provenance: what each file was made from (checked by the next stage) ----

def digest_bytes(*chunks):
    import hashlib
    h = hashlib.sha1()
    for chunk in chunks:
        h.update(chunk if isinstance(chunk, bytes) else str(chunk).encode())
    return h.hexdigest()[:16]


def file_digest(path):
    """sha1 (16 hex digits) of a file's bytes, read in 16 MB blocks."""
    import hashlib
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()[:16]


def tensor_digest(*tensors):
    """One digest of tensors' values (shape and dtype included): the identity of what a file holds. The bytes are
    hashed in place, without a copy (the corpus features of iNaturalist are 1.7 GB)."""
    import hashlib
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def names_digest(classnames):
    return digest_bytes("\n".join(classnames))


def split_digest(samples, root):
    """The split as (relative path, label) pairs: the same list under another root gives the same digest."""
    return digest_bytes("\n".join(f"{os.path.relpath(p, root)} {y}" for p, y, _ in samples))


def model_fingerprint(model, pretrained):
    """What the CLIP was built from: the config file's and the weights file's bytes, or the name and the tag."""
    def part(value):
        return f"{Path(value).name}:{file_digest(value)}" if value and Path(value).is_file() else str(value)
    return f"{part(model)}|{part(pretrained)}"


def load_text_features(path, classnames, data_root, model, pretrained, mmap=False):
    """text_features.pt from stage 02, checked against this run: class count, names, model and weights."""
    text = load_checkpoint(path, "stage 02 (02_cache_descriptors.py)", mmap=mmap)
    check_meta(text["meta"], path, num_classes=len(classnames), model=resolve_model_name(model), pretrained=pretrained)
    check_provenance(path, text["meta"], {
        "classnames_digest": (names_digest(classnames), f"the class names of {data_root}"),
        "model_fingerprint": (model_fingerprint(model, pretrained), f"--model {model} --pretrained {pretrained}")})
    return text


# ---- trainings: what a trained model is made from, and the checkpoint an interrupted training continues from. Stage
#      03, stage 04 and every compared system check these facts here, in one place ----

TRAINING_FACTS = {"classnames_digest": "class names", "train_split_digest": "training split",
                  "text_features_digest": "text features", "model_fingerprint": "model"}


def training_facts(classnames, samples, data_root, text):
    """What a trained model is made from, by digest: kept in its meta, checked on resume and by the stage reading it."""
    return dict(classnames_digest=names_digest(classnames), train_split_digest=split_digest(samples, data_root),
                text_features_digest=text["meta"]["digest"], model_fingerprint=text["meta"]["model_fingerprint"])


def check_training_facts(path, meta, facts, other=None):
    """Stop when a trained model or checkpoint at `path` was made from other inputs than `facts` (training_facts)."""
    check_provenance(path, meta, {key: (facts[key], f"this run's {what}") for key, what in TRAINING_FACTS.items()},
                     other)


# arguments a resumed training may change: they change neither what is trained nor how (paths are checked by digest;
# a memory or speed switch after an out-of-memory error must not restart a training). The epochs are not among them:
# the learning-rate schedule follows them from the first step
RESUME_FREE = {"workers", "log_every", "resume", "fresh", "device", "compile", "precision", "feature_cache", "out",
               "data_root", "features", "model", "pretrained", "split", "shot_rule", "grad_checkpointing", "decode"}


def check_resume_args(saved, args, path, free=RESUME_FREE):
    """Refuse to continue a checkpoint under other training settings, naming each one and both values."""
    changed = {k: v for k, v in vars(args).items() if k not in free and saved.get(k) != v}
    if changed:
        lines = [f"--{k.replace('_', '-')}: {saved.get(k)!r} in {path}, {v!r} now" for k, v in changed.items()]
        schedule = [k for k in changed if k.startswith("epochs")]
        hint = (f"\nIts learning-rate schedule was set for {', '.join(f'{k} {saved.get(k)}' for k in schedule)} from "
                "the first step: continuing it to another length would label a run with epochs whose schedule was "
                "another's. Resume with the same epochs (Make: EPOCHS=...), or start over (FRESH=1).") if schedule else ""
        raise SystemExit(f"{path} was trained with other settings, so --resume would mix two runs:\n  "
                         + "\n  ".join(lines) + (hint or "\nResume with the same settings, or start over (FRESH=1)."))


class Checkpoint:
    """A training's last.pt: written after every epoch and removed once the training's output is written, so a last.pt
    found at the start is an interrupted training. It is never overwritten without a word: without --resume the run
    stops, naming the epoch it holds; --fresh removes it, saying so, and starts over; --resume continues it after
    checking the settings (check_resume_args), the inputs by digest (check_training_facts) and the schedule."""

    def __init__(self, path, meta, args, free=RESUME_FREE, writer=True):
        self.path, self.meta, self.args, self.free, self.writer = Path(path), meta, args, free, writer

    @staticmethod
    def describe(state):
        args = state["meta"]["args"]
        phase = f"{state['phase']} " if "phase" in state else ""
        total = state.get("epochs", args.get("epochs"))
        return f"{phase}epoch {state['epoch']} of {total}"

    def start(self):
        """The state to continue from, or None to train from the first epoch."""
        say = print if self.writer else (lambda *a, **k: None)
        if not self.path.exists():
            if getattr(self.args, "resume", False):
                say(f"note: --resume, but {self.path} holds no interrupted training: training from the first epoch")
            return None
        state = load_checkpoint(self.path, "an earlier run of this training")
        where = f"{self.describe(state)} in {self.path}"
        if getattr(self.args, "fresh", False):
            if self.writer:
                self.path.unlink(missing_ok=True)
            say(f"--fresh: {where}, an interrupted training, removed; starting over")
            return None
        if not getattr(self.args, "resume", False):
            raise SystemExit(f"{where}: an interrupted training is there. RESUME=1 continues it (--resume), FRESH=1 "
                             "starts over and removes it (--fresh)")
        check_resume_args(state["meta"]["args"], self.args, self.path, self.free)
        check_training_facts(self.path, state["meta"], self.meta)
        say(f"resuming {where}")
        return state

    def save(self, state):
        if self.writer:
            atomic_torch_save(dict(state, meta=self.meta), self.path)

    def finish(self):
        """The training's output is written: last.pt goes."""
        if self.writer:
            self.path.unlink(missing_ok=True)


def check_provenance(path, meta, expected, other=None):
    """Stop naming both files when an input was made from other class names, another split, another model or another
    upstream file. `expected`: {fact: (value this run has, where that value comes from)}."""
    wrong = []
    for key, (value, source) in expected.items():
        if meta.get(key) != value:
            wrong.append(f"{key} differs: {path} has {meta.get(key)!r}, {source} gives {value!r}")
    if wrong:
        raise SystemExit(f"{path} was not made from this run's inputs" + (f" (compared with {other})" if other else "")
                         + ":\n  " + "\n  ".join(wrong) + "\nRebuild it (make does this when its inputs change) or "
                         "point this stage at the matching file.")


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def make_meta(stage, args, **facts):
    """The meta dict every stage output carries: what made it and from what."""
    from importlib import metadata  # the installed versions, without importing open_clip (stage 01 needs none of it)
    versions = {"python": sys.version.split()[0], "torch": str(torch.__version__), "numpy": str(np.__version__),
                "open_clip": metadata.version("open_clip_torch")}
    safe_args = {k: v for k, v in vars(args).items() if "key" not in k or k.endswith("_file")}  # never a key
    return dict(stage=stage, args=safe_args, versions=versions, git_commit=git_commit(), **facts)


def check_meta(meta, path, **expected):
    """Stop with a clear message when an input file was made for another dataset, model or width. A local weights file
    (pretrained) may be spelt another way (relative, absolute, a link): its content is checked by model_fingerprint."""
    if Path(str(expected.get("pretrained"))).is_file():
        expected = {k: v for k, v in expected.items() if k != "pretrained"}
    wrong = [f"{k}: file has {meta.get(k)!r}, this run needs {v!r}"
             for k, v in expected.items() if meta.get(k) != v]
    if wrong:
        raise SystemExit(f"{path} does not fit this run ({'; '.join(wrong)}). It was made by "
                         f"{meta.get('stage', 'another stage')} with other settings: rebuild it "
                         "(make removes stale files) or point this stage at the right file.")
