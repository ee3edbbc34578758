"""The toy world's pictures and words, shared by its two builders: 00_pretrain_toy_clip.py (the catalogue the tiny CLIP
learns from, once, shipped in toy_clip/) and 00_make_toy.py (the long-tailed task, one world per seed).

The catalogue is the tiny CLIP's web: patterned tiles, each filling most of its picture as a product photo does, half
in daylight and half photographed in every light, colour balance and noise (WebCamera), with captions in plain words.
The task is what a user brings: the same kind of tiles photographed by a field camera whose colours are off, smaller
in the frame and with leaves lying on them, named with some words the CLIP never read. numpy and PIL only: stage 00
imports no torch to draw.
"""
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

# ---- what there is: colours and patterns. The task uses the first six of each; the catalogue knows them all ----
COLOURS = {"red": (215, 40, 40), "orange": (240, 140, 30), "yellow": (230, 210, 40), "green": (45, 165, 60),
           "blue": (40, 80, 215), "purple": (135, 50, 170),
           "pink": (240, 120, 185), "brown": (125, 75, 35), "grey": (125, 125, 125), "teal": (30, 150, 150)}
WARMTH = {"red": "warm", "orange": "warm", "yellow": "warm", "pink": "warm", "brown": "warm",
          "green": "cool", "blue": "cool", "purple": "cool", "teal": "cool"}
# pattern -> (adjective, plain descriptions in the captions' words)
PATTERNS = {
    "stripes": ("striped", ["lines running across", "bands running across"]),
    "columns": ("columned", ["lines running up and down", "bands running up and down"]),
    "checks": ("checked", ["squares like a chess board", "squares of two colours in turn"]),
    "dots": ("dotted", ["small round spots", "round spots in rows"]),
    "slants": ("slanted", ["lines running at a slant", "bands running at a slant"]),
    "grid": ("gridded", ["thin lines crossing both ways", "thin lines crossing like a net"]),
    "waves": ("wavy", ["lines that wave across", "bands that wave across"]),
    "rings": ("ringed", ["rings inside rings", "round lines inside each other"]),
    "plain": ("plain", ["no marks at all", "one even colour"]),
}
TASK_COLOURS = ["red", "orange", "yellow", "green", "blue", "purple"]
TASK_PATTERNS = ["stripes", "columns", "checks", "dots", "slants", "grid"]
CANVAS, SIZE = 64, 32  # drawn at 64 px, stored at 32 px (smooth edges)
ROWS, COLS = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)  # every pixel's (y, x) on the canvas
GROUND = np.array([235, 235, 228], dtype=np.float32)  # the tile's pale ground between the marks
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's
# the tiny CLIP: a 4-layer ViT of width 64 on 32 px pictures (16 patches of 8 px) and a 3-layer text tower
CLIP_CONFIG = {"embed_dim": 128, "quick_gelu": True,
               "vision_cfg": {"image_size": SIZE, "layers": 4, "width": 64, "patch_size": 8, "head_width": 32},
               "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3}}


# ---- pictures ----

def pattern_ink(pattern, period, phase, cy, cx):
    """(CANVAS, CANVAS) bool: where a pattern's ink is; `period` in canvas pixels, rings centred on (cy, cx)."""
    y, x, half = ROWS + phase, COLS + phase, period / 2
    if pattern == "stripes":
        return (y // half) % 2 == 0
    if pattern == "columns":
        return (x // half) % 2 == 0
    if pattern == "checks":
        return ((x // half) + (y // half)) % 2 == 0
    if pattern == "slants":
        return ((x + y) // half) % 2 == 0
    if pattern == "grid":
        return ((x % period) < period / 4) | ((y % period) < period / 4)
    if pattern == "waves":
        return ((y + 0.18 * period * np.sin(2 * np.pi * x / (1.5 * period))) // half) % 2 == 0
    if pattern == "rings":
        return (np.hypot(ROWS - cy, COLS - cx) // half) % 2 == 0
    if pattern == "plain":
        return np.ones((CANVAS, CANVAS), bool)
    dy, dx = y % period - half, x % period - half  # dots
    return dx ** 2 + dy ** 2 < (0.3 * period) ** 2


def render(colour, pattern, rng, camera=None):
    """One 32 px RGB picture of a patterned tile filling most of the frame, on a blurred background. camera=None:
    daylight, the catalogue's (the tile 55 to 100 % of the picture); otherwise a field camera (FieldCamera) frames,
    clutters and develops the picture."""
    noise = rng.normal(0, 14, (8, 8, 3))
    bg = np.clip(rng.integers(70, 200, 3) + noise.repeat(8, 0).repeat(8, 1), 0, 255).astype(np.uint8)  # 8 x 8 blocks
    blurred = Image.fromarray(bg).resize((CANVAS, CANVAS), Image.BILINEAR).filter(ImageFilter.GaussianBlur(2))
    canvas = np.asarray(blurred, dtype=np.float32).copy()
    low, high = (0.55, 1.0) if camera is None else camera.area
    side = CANVAS * np.sqrt(rng.uniform(low, high))
    cx, cy = rng.uniform(side / 2, CANVAS - side / 2, 2) if side < CANVAS else (CANVAS / 2, CANVAS / 2)
    tile = (np.abs(COLS - cx) < side / 2) & (np.abs(ROWS - cy) < side / 2)
    ink = np.clip(np.array(COLOURS[colour], np.float32) + rng.integers(-18, 19, 3), 0, 255)
    mask = pattern_ink(pattern, rng.uniform(12, 18), rng.uniform(0, 18), cy, cx)
    canvas[tile & mask] = ink
    canvas[tile & ~mask] = GROUND + rng.integers(-10, 11, 3)
    if camera is not None:
        camera.clutter(canvas, rng)
    small = Image.fromarray(canvas.astype(np.uint8)).resize((SIZE, SIZE), Image.LANCZOS)
    if camera is not None and camera.blur:
        small = small.filter(ImageFilter.GaussianBlur(camera.blur))
    img = np.asarray(small, dtype=np.float32)
    img = img + rng.normal(0, 4, img.shape)
    if camera is not None:
        img = camera(img, rng)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


class FieldCamera:
    """The task's camera, against the catalogue's daylight: a warm colour cast, the same for every picture (learnt once,
    from the head classes, by prompts inside the tower), and what varies from picture to picture: the light
    (brightness x U(light)), sensor noise, the tile's share of the frame (`area`, about as much as an ImageNet object
    takes of its photo) and `blobs` leaves in dull colours lying on it."""

    def __init__(self, cast=(10, 5, -10), noise=30.0, light=(0.5, 1.4), area=(0.25, 0.9), blobs=5,
                 blob_colours=("grey", "brown", "teal", "pink"), blur=0.0):
        self.cast, self.noise, self.light, self.area = np.array(cast, np.float32), noise, light, area
        self.blobs, self.blob_colours, self.blur = blobs, blob_colours, blur

    def clutter(self, canvas, rng):
        for _ in range(self.blobs):
            cy, cx = rng.uniform(0, CANVAS, 2)
            ry, rx = rng.uniform(5, 12, 2)
            blob = ((ROWS - cy) / ry) ** 2 + ((COLS - cx) / rx) ** 2 < 1
            colour = COLOURS[self.blob_colours[rng.integers(len(self.blob_colours))]]
            canvas[blob] = np.array(colour, np.float32) + rng.integers(-20, 21, 3)

    def __call__(self, img, rng):
        return img * rng.uniform(*self.light) + self.cast + rng.normal(0, self.noise, img.shape)


class WebCamera:
    """The web's photos of catalogue tiles, as a real CLIP's pretraining saw photos in every light: each picture its own
    brightness (x U(0.5, 1.4)), colour balance (U(-15, 15) per channel) and sensor noise (sigma U(0, 30)), framed as
    the catalogue's (the tile 55 to 100 % of the picture) and with nothing lying on it. The field's warm cast is one
    balance among these; its leaves and wider framing the CLIP never saw."""

    area, blur = (0.55, 1.0), 0.0

    def clutter(self, canvas, rng):
        pass  # nothing lies on a web photo's tile

    def __call__(self, img, rng):
        light, balance = rng.uniform(0.5, 1.4), rng.uniform(-15, 15, 3)
        return img * light + balance + rng.normal(0, rng.uniform(0, 30), img.shape)


# ---- words the CLIP learns from ----

NOUNS = {"stripes": "stripes", "columns": "columns", "checks": "checks", "dots": "dots", "slants": "slants",
         "grid": "a grid", "waves": "waves", "rings": "rings", "plain": "no pattern"}


def captions():
    """(caption, colour or None, pattern or None): the catalogue's sentences. A caption fits a picture when every
    attribute it names matches."""
    out = []
    for c in COLOURS:
        for p, (adj, descs) in PATTERNS.items():
            out += [(f"a photo of a {c} {adj} tile.", c, p), (f"a {c} {adj} tile.", c, p),
                    (f"a {c} tile with {NOUNS[p]}.", c, p), (f"{descs[0]}, coloured {c}.", c, p)]
            out += [(f"a tile with {c} {d}.", c, p) for d in descs]
        out += [(f"a {c} tile.", c, None), (f"something {c}.", c, None), (f"a tile coloured {c}.", c, None)]
    for p, (adj, descs) in PATTERNS.items():
        out += [(f"a {adj} tile.", None, p), (f"a tile with {NOUNS[p]}.", None, p)]
        out += [(f"{d}.", None, p) for d in descs]
    for warmth in ("warm", "cool"):
        out += [(f"a tile in a {warmth} colour.", (warmth,), None), (f"a {warmth} colour.", (warmth,), None)]
    return out


def fits(caption_colour, caption_pattern, colour, pattern):
    """Does a caption naming (caption_colour, caption_pattern) fit a picture of (colour, pattern)?"""
    if isinstance(caption_colour, tuple):  # a warmth
        ok_colour = WARMTH.get(colour) == caption_colour[0]
    else:
        ok_colour = caption_colour in (None, colour)
    return ok_colour and caption_pattern in (None, pattern)


# ---- the shipped weights: compact on disk, whole in a toy world. Both are safetensors files (a JSON header, then
#      the raw little-endian arrays), which numpy reads and writes alone and open_clip loads: building a world needs
#      no torch ----

SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "I32": np.int32}


def safetensors_bytes(arrays, metadata=None):
    """The bytes of a safetensors file holding `arrays` ({name: numpy array}) in name order, and `metadata` ({str: str})
    in its header. The same arrays always give the same bytes."""
    codes = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
    header, blobs, offset = {}, [], 0
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()  # C order, whatever the array's
        header[name] = dict(dtype=codes[a.dtype], shape=list(a.shape), data_offsets=[offset, offset + len(data)])
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the arrays start 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def read_safetensors(data, name="weights"):
    """({name: numpy array}, metadata) of a safetensors file's bytes; `name` says which file in an error."""
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
        body = memoryview(data)[8 + size:]
        metadata = header.pop("__metadata__", {})
        arrays = {k: np.frombuffer(body[v["data_offsets"][0]:v["data_offsets"][1]],
                                   np.dtype(SAFETENSORS_DTYPES[v["dtype"]]).newbyteorder("<")).reshape(v["shape"])
                  for k, v in header.items()}
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{name}: not a safetensors file of this kit ({e})") from None
    return arrays, metadata


def compact_state(state, used_tokens):
    """The compact file's contents of a CLIP state dict (torch tensors): every array in half precision, without the
    token-embedding rows no caption uses (49,408 x 64 floats, most of the file); expand_clip rebuilds those rows as an
    untrained model has them."""
    emb = state["token_embedding.weight"]
    arrays = {k: v.detach().cpu().half().numpy() for k, v in state.items() if k != "token_embedding.weight"}
    arrays["compact.token_ids"] = used_tokens.cpu().numpy().astype(np.int32)
    arrays["compact.token_rows"] = emb[used_tokens].detach().cpu().half().numpy()
    return arrays, {"vocab": ",".join(str(n) for n in emb.shape),
                    "rebuild": "numpy default_rng(0).standard_normal(vocab) * 0.02"}


def expand_clip(compact):
    """The whole float32 state dict ({name: numpy array}) of a compact file's contents, as open_clip loads it."""
    arrays, metadata = compact
    vocab = tuple(int(n) for n in metadata["vocab"].split(","))
    emb = np.random.default_rng(0).standard_normal(vocab).astype(np.float32) * 0.02
    emb[arrays["compact.token_ids"].astype(np.int64)] = arrays["compact.token_rows"].astype(np.float32)
    state = {k: v.astype(np.float32) for k, v in arrays.items() if not k.startswith("compact.")}
    state["token_embedding.weight"] = emb
    return state


def clip_digest(path):
    """sha256 of a weights file's bytes."""
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def read_clip(path):
    """The compact weights at `path` (compact_state's arrays and metadata), after checking them against their digest
    (toy-clip.sha256 beside them, written with them): a truncated, corrupted or replaced file (a Git LFS pointer, say)
    stops here, naming what to do."""
    path = Path(path)
    sidecar = path.with_suffix(".sha256")
    if not path.exists():
        raise FileNotFoundError(f"{path}: the toy world's tiny CLIP is not there; it is committed with the kit (git "
                                f"checkout {path}), or `make toy-clip` trains it again")
    if not sidecar.exists():
        raise FileNotFoundError(f"{sidecar}: the digest of {path} is missing (git checkout {sidecar})")
    expected = sidecar.read_text().split()[0]
    data = path.read_bytes()
    found = hashlib.sha256(data).hexdigest()
    if found != expected:
        raise ValueError(f"{path}: sha256 {found[:16]}..., but {sidecar} says {expected[:16]}...: the file is damaged "
                         f"or not the one its digest was written for. Restore both (git checkout {path.parent}) or "
                         "train them again (make toy-clip)")
    return read_safetensors(data, str(path))
