"""What every script of the kit shares that needs no torch: the datasets' facts and split files, class names, the flags'
recipes and ranges, the metrics, atomic writes and run folders, and the provenance every output carries.

common.py adds the torch half (loaders, CLIP, VPT, the method's arithmetic, checkpoints) and takes in all of this, so a
stage writes common.<name> for either half. The scripts that need no torch (01_build_corpus.py, make_tables.py,
report.py, tune_toy.py, 00_make_toy.py until it writes the CLIP) import this module alone: importing torch takes 3 s
on a 2-core CPU, and `make tables` runs such scripts six times.

Nothing here runs on import.
"""
import argparse
import contextlib
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from datastamp import flat_folder, image_path

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
        paper_wiki=True,  # the paper's corpus includes VL-LTR's Wikipedia release for this benchmark
        source="the OLTR release (github.com/zhmiao/OpenLongTailRecognition-OLTR, ImageNet_LT_*.txt), "
               "paths relative to the ILSVRC2012 root (train/<wnid>/..., val/<wnid>/...)"),
    "places_lt": dict(
        num_classes=365, eval_split="test",
        splits={"train": "Places_LT_train.txt", "val": "Places_LT_val.txt", "test": "Places_LT_test.txt"},
        lines={"train": 62500, "val": 7300, "test": 36500},
        paper_wiki=True,
        source="the OLTR release (Places_LT_*.txt), paths relative to the Places365-standard root"),
    "inat2018": dict(
        num_classes=8142, eval_split="val",
        splits={"train": "iNaturalist18_train.txt", "val": "iNaturalist18_val.txt"},
        json={"train": "train2018.json", "val": "val2018.json"},
        lines={"train": 437513, "val": 24426},
        paper_wiki=True,
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
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(not_utf8(path)) from None


def not_utf8(path):
    """The message for a text file that is not UTF-8 (a Latin-1 or GBK export): its first such line and byte."""
    data = Path(path).read_bytes()
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    try:
        data.decode("utf-8")
        return f"{path}: not UTF-8 text"
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        return (f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8, e.g. "
                f"iconv -f latin1 -t utf-8")


def missing_hint(path):
    """For a path that is not what was looked for: a file where a folder was meant or the other way round, a file on
    its way, or which of its folders is missing and the names beside it that are close (a typo in DATA_ROOT or
    DESCRIPTORS); '' where the path's folder exists and nothing there is close."""
    path = Path(path)
    if path.exists():
        return f" ({path} is a {'folder' if path.is_dir() else 'file'})"
    parts = [path]
    while not parts[-1].parent.exists() and parts[-1].parent != parts[-1]:
        parts.append(parts[-1].parent)
    missing, folder = parts[-1], parts[-1].parent
    if not folder.is_dir():
        return f" ({folder} is a file, not a folder)"
    try:
        names = [entry.name for entry in folder.iterdir()]
    except OSError:
        names = []
    close = difflib.get_close_matches(missing.name, names, n=3, cutoff=0.75)
    notes = [f"there is no folder {missing}"] if missing != path else []
    notes += [f"did you mean {' or '.join(str(folder / n) for n in close)}?"] if close else []
    return f" ({'; '.join(notes)})" if notes else ""


def check_folder_to_be(folder, what):
    """A folder a stage makes when it first writes there (a feature cache): a file in its place or on its path stops
    the stage now, naming it, not after the work whose results were to go there."""
    above = Path(folder)
    while not above.exists() and above.parent != above:
        above = above.parent
    if folder and not above.is_dir():
        raise SystemExit(f"{folder}: {what} cannot be made there, {above} is a file")


def read_json(path, what="JSON file"):
    """JSON from a user's file; a missing file says what it was to be, a syntax error names its line and column."""
    try:
        return json.loads(read_text(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found{missing_hint(path)}") from None
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


def _names_from_split_folders(root, dataset):
    """Class names read off the training list's paths, where each names its class's folder as Places365's do
    ('data_256/a/apartment_building/outdoor/00000001.jpg 8' -> 'apartment building outdoor'); None where the list is
    missing, a label is absent, or two labels share a folder or one has two. The labels come from the list, so no
    order of the folders is assumed."""
    path = _split_path(root, dataset, "train")
    if not path.exists():
        return None
    num_classes = dataset_info(dataset)["num_classes"]
    folders = {}
    for image, label, _ in _read_txt_lines(path, num_classes):
        parts = Path(image).parent.parts
        letter = next((i for i, part in enumerate(parts) if len(part) == 1 and part.isalpha()), None)
        folder = "/".join(parts[letter + 1:] if letter is not None else parts[-1:])
        if not folder or folders.setdefault(label, folder) != folder:
            return None
    if len(folders) != num_classes or len(set(folders.values())) != num_classes:  # one folder a class, and each its own
        return None
    warn_once(f"note: the Places-LT class names are read from the class folders that {path} names "
              "(no classnames.txt or categories_places365.txt under the data root)")
    return [readable_name(folders[c]) for c in range(num_classes)]


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
        else:
            names = _names_from_split_folders(root, dataset)
        if names is None and (root / "train").is_dir():
            names = [readable_name(d.name) for d in sorted((root / "train").iterdir()) if d.is_dir()]
        if names is None:
            raise FileNotFoundError(f"{root}: need classnames.txt, categories_places365.txt (Places365's file list "
                                    "archive), a Places_LT_train.txt whose paths name each class's folder "
                                    "(data_256/a/airfield/...), or a train/ folder of class folders to name the "
                                    "Places-LT classes")
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
        where = ("CIFAR_ROOT=<the folder holding cifar-100-python> (or that folder as DATA_ROOT)"
                 if dataset == "cifar100_lt"
                 else f"DATA_ROOT=/path/to/{dataset} (the README's Quick start shows each dataset's folder)")
        if not Path(root).is_dir():
            raise SystemExit(f"DATA_ROOT={root}: no such folder{missing_hint(root)}. {label}'s {files}{alt} are looked "
                             f"for there; pass {where}.{hint}")
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
    flat = flat_folder(root, [rel for rel, _, _ in samples])
    if flat:
        warn_once(f"note: {path} names its images in class folders ({samples[0][0]}), but they lie one folder up, as "
                  f"in ImageNet's own val/ ({os.path.relpath(image_path(root, samples[0][0], flat), root)}); they "
                  "are read from there")
    samples = [(image_path(root, rel, flat), label, where) for rel, label, where in samples]
    if check_files:
        for i, (p, _, where) in enumerate(samples):
            try:
                size = os.stat(p).st_size
            except FileNotFoundError:
                raise FileNotFoundError(missing_images(path, root, samples, i)) from None
            if size == 0:
                raise ValueError(f"{where}: image {p} is an empty (zero-byte) file")
    return samples


def missing_images(path, root, samples, first):
    """The message for a split whose image samples[first] is missing: how many of its images are missing too, and,
    when none is found, that the file's paths are read from DATA_ROOT (a wrong root or a layout the file does not
    name, such as Places365's train/airfield/ for OLTR's data_256/a/airfield/)."""
    p, _, where = samples[first]
    missing = 1 + sum(not os.path.exists(q) for q, _, _ in samples[first + 1:])
    if first == 0 and missing == len(samples):
        rel = os.path.relpath(p, root)
        return (f"none of the {len(samples)} images {path} lists is in {root}: {where} names {rel}, looked for as "
                f"{p}. The paths in a split file are read from DATA_ROOT (or are absolute): is {root} the folder "
                f"they start from?")
    return f"{where}: image not found: {p} (images missing from {path.name}: {missing} of {len(samples)})"


LABEL = re.compile(r"-?[0-9]+")  # int() would also take '1_0' (as 10), ' 1' or '١'


def _read_txt_split(path, num_classes):
    try:
        return _read_txt_lines(path, num_classes)
    except UnicodeDecodeError:
        raise ValueError(not_utf8(path)) from None


def _read_txt_lines(path, num_classes):
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


# ---------------------------------------------------------------------------------------------------
# arguments: recipes and ranges, progress
# ---------------------------------------------------------------------------------------------------

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


# the choices of the stages' --decode and --precision flags (common.py does what they say)
DECODE_MODES = {
    "pil": "PIL decodes and open_clip's transform runs in the loader workers (float images cross over)",
    "tensor": "libjpeg-turbo (torchvision) decodes in the workers; crop, resize, normalise on the device",
    "device": "the workers read JPEG bytes; decoding (nvJPEG on CUDA), crop, resize, normalise on the device",
}
PRECISIONS = {
    "auto": "bf16 autocast on CUDA GPUs of compute capability 8.0 or more (Ampere on), float32 elsewhere",
    "fp32": "float32 everywhere (on CUDA: slower, and the image features are not rounded)",
    "bf16": "bf16 autocast on any device (on a CPU: to measure what bf16 changes)",
}


SEEDS = 2 ** 32  # --seed takes 0 to SEEDS - 1, as numpy's legacy seeding does


def seed_value(text):
    """--seed's type: a whole number from 0 to SEEDS - 1. numpy refuses a negative seed, and derived seeds must fit
    torch's 64 bits, so anything else would stop a run at its first random draw, perhaps a stage or an epoch in."""
    value = int(text) if re.fullmatch(r"\s*\d+\s*", text) else -1
    if not 0 <= value < SEEDS:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to {SEEDS - 1}, got {text!r}")
    return value


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


def groups_line(report):
    """'many 91.67 / med 80.83 / few 66.94' from an accuracy report; '-' for an empty group."""
    return " / ".join(f"{short} " + ("-" if report[group] is None else f"{report[group]:.2f}")
                      for group, short in (("many", "many"), ("medium", "med"), ("few", "few")))


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



INTERRUPT_KEPT = "what it had finished is kept: every file is written whole or not at all"
_interrupt_note = INTERRUPT_KEPT


def note_for_interrupt(text=INTERRUPT_KEPT):
    """What an interrupt (Ctrl-C) leaves behind, said in run_script's one line (a training names its last.pt)."""
    global _interrupt_note
    _interrupt_note = text


_memory_note = "other processes on the GPU (nvidia-smi lists them) take from it too, or a GPU with more memory runs it"


def note_for_memory(text):
    """What frees GPU memory in this script, said in run_script's one line when the GPU runs out of it."""
    global _memory_note
    _memory_note = text


def run_script(main):
    """A script's entry point: bad input (a missing or unreadable file, a value the kit refuses, a full disk) ends
    with its message on one line and exit status 1 instead of a traceback, and so does a GPU out of memory, with what
    frees some; an interrupt (Ctrl-C) ends with a line saying what is kept and exit status 130; HLC_TRACEBACK=1 shows
    the traceback."""
    try:
        main()
    except RuntimeError as e:  # torch.OutOfMemoryError, without importing torch here
        if type(e).__name__ != "OutOfMemoryError" or os.environ.get("HLC_TRACEBACK"):
            raise
        said = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else "out of memory"
        print(f"{Path(sys.argv[0]).name}: error: the GPU ran out of memory ({said}): {_memory_note}. "
              f"{_interrupt_note[0].upper()}{_interrupt_note[1:]}  (HLC_TRACEBACK=1 shows where)", file=sys.stderr,
              flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        if os.environ.get("HLC_TRACEBACK"):
            raise
        print(f"{Path(sys.argv[0]).name}: interrupted; {_interrupt_note}", file=sys.stderr, flush=True)
        sys.exit(130)
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
                         f"DATASET=<its name> (DATASET=toy builds a toy world); otherwise choose an empty or new "
                         "folder")
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


_HELD_LOCKS = {}


def hold_run_lock(directory, what):
    """Take an exclusive lock on DIRECTORY/.lock for the rest of this process (the OS releases it at exit, kill -9
    included): a second run writing to the same RUN stops at once and names the holder, where two trainings would
    otherwise interleave log.jsonl and overwrite each other's checkpoints. Re-taking it in the same process is a
    no-op."""
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
    from importlib import metadata  # installed versions, without importing torch or open_clip (stage 01 needs neither)

    def installed(dist, module):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:  # installed without pip's metadata: ask the module, if it is loaded
            return str(getattr(sys.modules.get(module), "__version__", "unknown"))
    versions = {"python": sys.version.split()[0], "torch": installed("torch", "torch"), "numpy": str(np.__version__),
                "open_clip": installed("open_clip_torch", "open_clip")}
    safe_args = {k: v for k, v in vars(args).items() if "key" not in k or k.endswith("_file")}  # never a key
    return dict(stage=stage, args=safe_args, versions=versions, git_commit=git_commit(), **facts)


def check_meta(meta, path, **expected):
    """Stop with a clear message when an input file was made for another dataset, model or width. A local weights file
    (pretrained) may be spelt another way (relative, absolute, a link): its content is checked by model_fingerprint."""
    if Path(str(expected.get("pretrained"))).is_file():
        expected = {k: v for k, v in expected.items() if k != "pretrained"}
    differ = [k for k, v in expected.items() if meta.get(k) != v]
    if differ:
        wrong = [f"{k}: file has {meta.get(k)!r}, this run needs {expected[k]!r}" for k in differ]
        made, same = meta.get("args") or {}, ""
        if {"model", "pretrained"} & set(differ) and "model" in made:
            # run by hand, a stage's default is the paper's CLIP: the toy's stages need the toy CLIP named
            same = (f" Or give this stage the CLIP the file was made with: --model {made['model']} "
                    f"--pretrained {made.get('pretrained')}.")
        raise SystemExit(f"{path} does not fit this run ({'; '.join(wrong)}). It was made by "
                         f"{meta.get('stage', 'another stage')} with other settings: rebuild it "
                         f"(make removes stale files) or point this stage at the right file.{same}")
