"""What two or more HLC stages share that needs torch: the loaders, CLIP loading, the VPT-deep wrapper, the scoring
functions of the method (Eq. 2, 4, Algorithm 1) and checkpoints. Everything that needs no torch (the datasets' facts
and split files, metrics, atomic writes, provenance) is in basics.py and taken in here, so a stage writes common.<name>
for either.

Nothing here runs on import. Each function is small enough to read in one go.
"""
import difflib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from basics import *  # noqa: F401,F403 - the half that needs no torch (basics.py)

# ---------------------------------------------------------------------------------------------------
# loaders (SPEC section 3)
# ---------------------------------------------------------------------------------------------------

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
    time: the toy's training ran at 340 images/s with it on 2 cores, at 600 without. Taken modulo 2**64 to fit torch's
    seeds, which changes nothing for a seed under 1.8 million and keeps a larger one (20250101) from overflowing."""
    if seed is not None:
        torch.default_generator.manual_seed(((seed * 1_000_003 + epoch) * 10_000_019 + i) % 2 ** 64)


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
    cores = available_cores()
    if workers < cores:
        torch.set_num_threads(min(torch.get_num_threads(), cores - workers))


def available_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def image_loader(samples, transform, decode, device, seed=None, workers=0, batch_size=None, batch_sampler=None):
    """(DataLoader, to_device): to_device(batch) -> (normalised images, labels) on `device`. `decode` is one of
    DECODE_MODES; 'pil' is the plain path, the others move the crop and resize (and for 'device' the JPEG
    decoding) to the device. On a CPU device, workers may lower the process's torch threads (share_cores)."""
    kind = torch.device(device).type
    cuda = kind == "cuda"
    if kind == "cpu" and workers:
        share_cores(workers)
    if workers > available_cores():  # torch's warning, twice a loader, says it may be slow; here it was faster
        import warnings
        warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
        warn_once(f"note: {workers} image-loading workers on {available_cores()} cores (WORKERS=, --workers): "
                  "JPEG decoding keeps ahead of the model with more workers than cores (docs/speed.md)")
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

def import_open_clip():
    """open_clip, imported without torch._dynamo, and returned.

    Two libraries open_clip imports load all of torch._dynamo as they load, for nothing the kit runs: torchvision's
    roi_align module imports one function from it, and timm decorates a method of one of its many models with
    torch.compiler.disable. That is 3 s of every stage's start-up on a 2-core CPU. So torchvision is imported with a
    stand-in for torch._dynamo.utils that imports the real function only if it is called, and open_clip with timm
    hidden, which open_clip needs only to build a timm-backed image tower (load_clip gives it timm before that).
    Neither stand-in outlives this function: torch.compile (stage 03's --compile) and a later `import timm` get the
    real modules. Where open_clip, torchvision or torch._dynamo is loaded already, nothing is hidden."""
    if "open_clip" in sys.modules or "torch._dynamo" in sys.modules:
        import open_clip
        return open_clip
    import importlib
    import types
    utils = "torch._dynamo.utils"
    stand_in = types.ModuleType(utils)
    stand_in.is_compile_supported = lambda *a, **k: importlib.import_module(utils).is_compile_supported(*a, **k)
    hidden = {utils: stand_in} if "torchvision" not in sys.modules else {}
    hidden.update({} if "timm" in sys.modules else {"timm": None})  # None: `import timm` fails, open_clip goes on
    sys.modules.update(hidden)
    try:
        import open_clip
    finally:
        for name, module in hidden.items():
            if name in sys.modules and sys.modules[name] is module:
                del sys.modules[name]
    return open_clip


def resolve_model_name(model):
    """An open_clip model name, or a path to a model-config JSON (registered, named by its stem)."""
    open_clip = import_open_clip()
    if model.endswith(".json"):
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(f"{path}: model config not found{missing_hint(path)}")
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        if os.sep in model or Path(model).exists():
            raise ValueError(f"MODEL={model} is neither an open_clip model name nor a model-config .json file"
                             f"{missing_hint(model)}")
        close = difflib.get_close_matches(model, open_clip.list_models(), n=5)
        raise ValueError(f"unknown open_clip model {model!r}; "
                         + (f"close names: {', '.join(close)}" if close else "open_clip.list_models() names them"))
    return model


def load_clip(model, pretrained, device="cpu", image_size=None):
    """Frozen open_clip model in eval mode, plus its train and eval transforms and resolved name.

    `pretrained`: a hub tag ('openai'), a local checkpoint file, or 'none' for random weights. `image_size`
    other than the model's builds it at that size; open_clip interpolates the pretrained positional embedding.
    """
    name = resolve_model_name(model)
    # float32 is float32 on a GPU too: cuDNN convolutions (a ViT's patch embedding, all of a ResNet tower) default to
    # TF32 on Ampere and later GPUs, matmuls do not. bf16 autocast (--precision auto on CUDA) is not affected
    torch.backends.cudnn.allow_tf32 = False
    open_clip = import_open_clip()
    if "timm_model_name" in (open_clip.get_model_config(name) or {}).get("vision_cfg", {}) \
            and open_clip.timm_model.timm is None:  # a timm-backed tower: its adapter is run again, now with timm
        import importlib
        importlib.reload(open_clip.timm_model)
    tag = None if pretrained in (None, "", "none") else pretrained
    if tag and not Path(tag).is_file():
        if Path(tag).suffix in (".pt", ".pth", ".bin", ".safetensors") or os.sep in tag:
            raise FileNotFoundError(f"PRETRAINED={tag}: weights file not found{missing_hint(tag)}")
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


def effective_precision(device, precision="auto"):
    """What the image tower computes in: "bf16" when asked, or under auto on a GPU with bf16 arithmetic (compute
    capability 8.0 on: Ampere and later); "fp32" otherwise. A T4 or an RTX 20xx (7.5) has none: torch would emulate
    it, no faster than float32 and less precise."""
    device = torch.device(device)
    if precision == "auto" and device.type == "cuda":
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"
    return "bf16" if precision == "bf16" else "fp32"


def image_autocast(device, precision="auto"):
    """bf16 autocast for the image tower on CUDA (precision auto); fp32 turns it off, bf16 turns it on anywhere."""
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=effective_precision(device, precision) == "bf16")


def pick_device(name="auto", probe=True):
    """'auto' (CUDA when there is one, else the CPU) or a device torch knows that this machine has. A CUDA device is
    probed with one small kernel (probe=False leaves it to the caller: under torchrun, once a process has its GPU)."""
    if name == "auto":
        device = torch.device("cuda" if cuda_available_or_refused() else "cpu")
        if device.type == "cuda" and probe:
            check_cuda_runs(device)
        return device
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} (DEVICE={name}): not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else (
                f"no NVIDIA driver, or not {driver_needed()}")
            raise ValueError(f"--device {name} (DEVICE={name}): this machine has no CUDA device torch can use ({why}); "
                             "use DEVICE=cpu or DEVICE=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name} (DEVICE={name}): this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), numbered from 0")
        if probe:
            check_cuda_runs(device)
    return device


def driver_needed():
    """The NVIDIA driver this torch build needs (the pinned one is a CUDA 13.0 build)."""
    cuda = torch.version.cuda or "?"
    return f"a driver for CUDA {cuda}" + (" (580 or newer)" if cuda.startswith("13.") else "")


def cuda_available_or_refused():
    """torch.cuda.is_available(), except where this machine shows an NVIDIA GPU (its /dev/nvidiaN) that torch cannot
    use: a driver too old for torch's CUDA, or a CPU-only torch. DEVICE=auto would then run a benchmark on the CPU,
    for days, without a word; that stops here with torch's reason. CUDA_VISIBLE_DEVICES set hides GPUs on purpose."""
    import glob
    import warnings
    with warnings.catch_warnings(record=True) as said:  # torch gives its reason as a warning, the first time only
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            return True
    gpus = sorted(glob.glob("/dev/nvidia[0-9]*"))
    if not gpus or "CUDA_VISIBLE_DEVICES" in os.environ:
        for w in said:  # what torch said, said as it would have been
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return False
    reason = " ".join(str(w.message).split(". ")[0] for w in said if "CUDA" in str(w.message)) or (
        "a CPU-only build" if torch.version.cuda is None else "torch.cuda.is_available() is False")
    needs = "" if torch.version.cuda is None else f"; it needs {driver_needed()}"
    raise ValueError(f"DEVICE=auto: this machine has an NVIDIA GPU ({gpus[0]}) that torch {torch.__version__} "
                     f"cannot use ({reason}{needs}). Update the driver, or run with your own torch and torchvision "
                     "built for this machine (PY=, docs/make.md); DEVICE=cpu runs on the CPU instead")


def tiny_kernel(device):
    torch.ones(8, device=device).add_(1).sum().item()


def check_cuda_runs(device):
    """Run one small kernel on a CUDA device, so that a GPU this torch build has no code for (the pinned build starts
    at compute capability 7.5: no V100, no P100) or a driver it cannot start stops with what to do, not with CUDA's
    "no kernel image is available" at a stage's first layer."""
    try:
        tiny_kernel(device)
    except RuntimeError as e:
        try:
            major, minor = torch.cuda.get_device_capability(device)
            gpu = f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
        except Exception:  # noqa: BLE001 - the same failure again: say what is known
            gpu = "its name and capability unknown"
        raise ValueError(f"DEVICE={device}: torch {torch.__version__} cannot run on this GPU ({gpu}): "
                         f"{str(e).strip().splitlines()[0]}. This build has code for "
                         f"{' '.join(torch.cuda.get_arch_list()) or '?'} and needs {driver_needed()}. Run with your "
                         "own torch and torchvision built for this GPU (PY=, docs/make.md), or DEVICE=cpu") from None


def is_vit(visual):
    """Whether an image tower is open_clip's own VisionTransformer, the one whose layers the kit's prompts, LIFT's
    tuners and LT-DPT's prompts enter (not a ResNet CLIP's ModifiedResNet, nor a timm-backed tower)."""
    return hasattr(getattr(visual, "transformer", None), "resblocks") and hasattr(visual, "conv1") \
        and hasattr(visual, "_embeds")


def vit_blocks(visual, what):
    """The layers of open_clip's VisionTransformer; a refusal that names the method and the tower for any other."""
    if not is_vit(visual):
        raise ValueError(f"{what}: this CLIP's image tower is a {type(visual).__name__}, not the ViT built by "
                         f"open_clip itself that it runs in; pick a ViT model such as MODEL=ViT-B-16-quickgelu "
                         f"(open_clip's RN50-style and timm-backed towers have no such layers)")
    if not getattr(visual.transformer, "batch_first", True):
        raise ValueError(f"{what}: needs a batch-first open_clip VisionTransformer (open_clip >= 3)")
    return visual.transformer.resblocks


class PromptedVisual(nn.Module):
    """VPT-deep (paper Eq. 3) around a frozen open_clip VisionTransformer.

    Layer i < depth sees `num_tokens` learnable prompts spliced in after CLS (layer 0 inserts them,
    later layers overwrite the previous layer's prompt outputs); layers from `depth` on run without
    them. With num_tokens = 0 this is exactly `visual(images)`, and any image tower will do.
    """

    def __init__(self, visual, num_tokens=20, depth=12, what="visual prompts (VPT; --prompt-tokens 0 trains without)"):
        super().__init__()
        self.visual = visual
        self.vit = bool(num_tokens) or is_vit(visual)  # no prompts: any image tower (a ResNet CLIP's too)
        blocks = vit_blocks(visual, what) if self.vit else ()
        self.num_tokens, self.depth = num_tokens, min(depth, len(blocks)) if num_tokens else 0
        width = visual.conv1.out_channels if self.vit else 0
        patch = visual.conv1.kernel_size[0] if self.vit else 1
        bound = math.sqrt(6.0 / (3 * patch * patch + width))  # VPT's init: +-0.0625 for ViT-B/16
        self.prompts = nn.Parameter(torch.empty(self.depth, num_tokens, width).uniform_(-bound, bound))
        self.grad_checkpointing = False

    def train(self, mode=True):
        super().train(mode)
        self.visual.eval()  # frozen backbone stays in eval mode (no dropout, fixed norms)
        return self

    def forward(self, images):
        v, n = self.visual, self.num_tokens
        if not self.vit:
            return v(images)
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
    kind = pick_device(device_arg.split(":")[0], probe=False).type  # CUDA refused where none
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"--device {device_arg} (DEVICE={device_arg}): under torchrun (GPUS=) the kit runs on cuda or "
                         "cpu")
    if kind == "cuda" and device_arg not in ("cuda", "auto"):
        warn_once(f"note: under torchrun each process takes the GPU of its LOCAL_RANK; the index of --device "
                  f"{device_arg} is not used (CUDA_VISIBLE_DEVICES picks the GPUs)")
    if kind == "cuda":
        count = torch.cuda.device_count()
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if per_node > count:  # every process stops, before set_device's "invalid device ordinal" in some of them
            raise ValueError(f"GPUS={per_node} starts {per_node} processes on this machine, one per GPU, but it has "
                             f"{count} CUDA device(s) torch can see (CUDA_VISIBLE_DEVICES="
                             f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use GPUS={count}")
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
        check_cuda_runs(device)
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


# ---- files that need torch: checkpoints, tensor digests, stage 02's features ----

def atomic_torch_save(obj, path):
    """torch.save, atomically. Written through a file handle, so that the archive's inner folder is "archive" and not
    the temporary file's random name: the same object gives the same bytes (and digest) every time."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


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


def check_tensors(path, entries, specs, sizes, writer):
    """Each entry named in `specs` ({key: (dtype, "C M d")}) must be a tensor of that dtype whose sizes agree, name by
    name, with `sizes` ({name: (size, where it comes from)}); a name not in `sizes` is fixed by the first tensor that
    has it. The message names the file, the entry and what disagrees; `writer` is the stage that writes such a file."""
    for key, (dtype, dims) in specs.items():
        t, dims = entries[key], dims.split()
        if not torch.is_tensor(t) or t.dtype != dtype or t.dim() != len(dims):
            what = f"a {t.dtype} tensor of shape {tuple(t.shape)}" if torch.is_tensor(t) else f"a {type(t).__name__}"
            raise ValueError(f"{path}: {key} is {what}; {writer} writes a {dtype} tensor of shape ({', '.join(dims)}) "
                             "(docs/outputs.md)")
        for name, size in zip(dims, t.shape):
            known, where = sizes.get(name, (None, None))
            if known is None:
                sizes[name] = (size, f"{key} has {size}")
            elif size != known:
                raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, {size} along {name}, where {where}: its "
                                 "entries do not belong together")


def check_entries(path, entries, needed, writer, made_from):
    """A stage's file is a dict holding every key in `needed`, its meta a dict; else a message naming what is not."""
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: holds a {type(entries).__name__}, not {writer}'s dict of tensors (docs/outputs.md)")
    missing = [k for k in needed if k not in entries]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)}; {writer}'s file holds {', '.join(needed)} "
                         "(docs/outputs.md)")
    if not isinstance(entries["meta"], dict):
        raise ValueError(f"{path}: its meta is a {type(entries['meta']).__name__}, not {writer}'s dict of what "
                         f"{made_from} was made from")


# text_features.pt's tensors (docs/outputs.md): dtype and shape, over N corpus sentences, C classes, M descriptors a
# class and the embedding width d
TEXT_TENSORS = {"corpus": (torch.float32, "N d"), "corpus_norm": (torch.float32, "N"),
                "corpus_labels": (torch.int64, "N"), "descriptors": (torch.float32, "C M d"),
                "desc_mask": (torch.bool, "C M"), "classname": (torch.float32, "C d")}


def check_text_features(text, path):
    """Stage 02's file against its contract and its own meta, before anything computes with it: a file written by
    another stage 02 or edited by hand stops here, naming the entry, not in a matrix product mid-training. Only shapes,
    dtypes, the corpus labels and the mask are read (stage 04 maps the corpus features without reading them)."""
    check_entries(path, text, (*TEXT_TENSORS, "descriptor_texts", "descriptor_raw", "logit_scale", "meta"), "stage 02",
                  "the file")
    meta = text["meta"]
    sizes = {"C": (meta.get("num_classes"), f"its meta's num_classes is {meta.get('num_classes')}"),
             "d": (meta.get("embed_dim"), f"its meta's embed_dim is {meta.get('embed_dim')}")}
    check_tensors(path, text, TEXT_TENSORS, sizes, "stage 02")
    labels, classes = text["corpus_labels"], sizes["C"][0]
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < classes:
        raise ValueError(f"{path}: corpus_labels run from {int(labels.min())} to {int(labels.max())}, outside [0, "
                         f"{classes}) for its {classes} classes")
    empty = (~text["desc_mask"].any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{path}: desc_mask marks no descriptor for class(es) {empty[:10]}; stage 02 gives a class "
                         "without one its class-name prompt as the one descriptor")
    for key in ("descriptor_texts", "descriptor_raw"):
        if len(text[key]) != classes:
            raise ValueError(f"{path}: {key} lists {len(text[key])} classes, the tensors {classes}")


# coarse.pt's tensors, over the text features' C, M and d and the file's own prompt depth and tokens
COARSE_TENSORS = {"prompts": (torch.float32, "prompt_depth prompt_tokens width"), "w_cls": (torch.float32, "C d"),
                  "w_llm": (torch.float32, "C M"), "class_counts": (torch.int64, "C")}


def check_coarse(coarse, path, text):
    """coarse.pt (stage 03's, or one's own stage 03's) against its contract (docs/outputs.md) and the text features
    it is evaluated with. Stage 04 reads its meta first, so a file made from another run's inputs is named as that."""
    check_entries(path, coarse, (*COARSE_TENSORS, "prompt_tokens", "prompt_depth", "scale", "meta"), "stage 03",
                  "the model")
    sizes = {name: (size, f"the text features' {name} is {size}")
             for name, size in zip("CMd", text["descriptors"].shape)}
    sizes.update({key: (coarse[key], f"its {key} is {coarse[key]}") for key in ("prompt_depth", "prompt_tokens")})
    check_tensors(path, coarse, COARSE_TENSORS, sizes, "stage 03")


def load_text_features(path, classnames, data_root, model, pretrained, mmap=False):
    """text_features.pt from stage 02, checked against this run: its entries, class count, names, model and weights."""
    text = load_checkpoint(path, "stage 02 (02_cache_descriptors.py)", mmap=mmap)
    meta = text.get("meta") if isinstance(text, dict) else None
    if isinstance(meta, dict):  # a file made for another run is named as that first
        check_meta(meta, path, num_classes=len(classnames), model=resolve_model_name(model), pretrained=pretrained)
    check_text_features(text, path)
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


def parser_defaults(parser, args):
    """Each flag's default as the parser declares it: what check_resume_args takes a flag to have been in a checkpoint
    written before the flag existed."""
    return {k: parser.get_default(k) for k in vars(args)}


def check_resume_args(saved, args, path, free=RESUME_FREE, defaults=None):
    """Refuse to continue a checkpoint under other training settings, naming each one and both values. A flag the
    checkpoint's run did not have yet (a later version of the kit added it) counts as unchanged at its default in
    `defaults`, which is what a new flag keeps the older code's behaviour at."""
    defaults = defaults or {}
    changed = {k: v for k, v in vars(args).items() if k not in free and saved.get(k, defaults.get(k)) != v}
    if changed:
        lines = [f"--{k.replace('_', '-')}: {saved.get(k)!r} in {path}, {v!r} now" for k, v in changed.items()]
        schedule = [k for k in changed if k.startswith("epochs")]
        hint = "" if not schedule else (
            f"\nIts learning-rate schedule was set for {', '.join(f'{k} {saved.get(k)}' for k in schedule)} from "
            "the first step: continuing it to another length would label a run with epochs whose schedule was "
            "another's. Resume with the same epochs (Make: EPOCHS=...), or start over (FRESH=1).")
        raise SystemExit(f"{path} was trained with other settings, so --resume would mix two runs:\n  "
                         + "\n  ".join(lines) + (hint or "\nResume with the same settings, or start over (FRESH=1)."))


class Checkpoint:
    """A training's last.pt: written after every epoch and removed once the training's output is written, so a last.pt
    found at the start is an interrupted training. It is never overwritten without a word: without --resume the run
    stops, naming the epoch it holds; --fresh removes it, saying so, and starts over; --resume continues it after
    checking the settings (check_resume_args), the inputs by digest (check_training_facts) and the schedule."""

    def __init__(self, path, meta, args, free=RESUME_FREE, writer=True, defaults=None, facts=True):
        self.path, self.meta, self.args, self.free, self.writer = Path(path), meta, args, free, writer
        self.defaults, self.facts = defaults, facts  # facts: check the inputs by digest (a training on a split)

    @staticmethod
    def describe(state):
        args = state["meta"]["args"]
        phase = f"{state['phase']} " if "phase" in state else ""
        total = state.get("epochs", args.get("epochs"))
        return f"{phase}{state.get('unit', 'epoch')} {state['epoch']} of {total}"

    def start(self):
        """The state to continue from, or None to train from the first epoch."""
        say = print if self.writer else (lambda *a, **k: None)
        if self.writer:
            note_for_interrupt("no epoch of the training had finished, so the next run starts it from the first")
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
        check_resume_args(state["meta"]["args"], self.args, self.path, self.free, self.defaults)
        if self.facts:
            check_training_facts(self.path, state["meta"], self.meta)
        say(f"resuming {where}")
        if self.writer:
            note_for_interrupt(f"{where} is kept: RESUME=1 continues it (--resume)")
        return state

    def save(self, state):
        if self.writer:
            atomic_torch_save(dict(state, meta=self.meta), self.path)
            note_for_interrupt(f"{self.path} holds {self.describe(dict(state, meta=self.meta))}: RESUME=1 continues "
                               "it (--resume), FRESH=1 starts over (--fresh)")

    def finish(self):
        """The training's output is written: last.pt goes."""
        if self.writer:
            self.path.unlink(missing_ok=True)
            note_for_interrupt()
