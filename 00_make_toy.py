"""Stage 00: the toy world, a miniature long-tailed benchmark with its own tiny CLIP (DATASET=toy only).

Writes  data/toy/ in the generic layout: images/, train.txt (long-tailed, imbalance ratio 100), val.txt and test.txt
        (balanced), classnames.txt, wiki/desc_<label>.txt, descriptors.json (M = 10 per class, written the way an LLM
        answers), descriptor_kinds.json (which descriptor is which kind), clip/toy-clip.json (an open_clip model config)
        and clip/toy-clip.pt (its weights), and .complete last.

    python 00_make_toy.py --out data/toy

The world, part by part, with the job each part of HLC has in it (docs/toy-world.md says what came out):
- Classes are patterned tiles, colour x pattern (6 x 6 = 36: stripes, columns, checks, dots, slants, grid), 200 down
  to 2 training images per class (imbalance ratio 100; which classes are head or tail is random), 10 val and 20 test
  images per class. Logit adjustment has the head bias of any long tail to remove.
- The tiny CLIP (a 3-layer ViT of width 64 on 32 px images, 16 patches) learns contrastively from "catalogue"
  pictures: a big tile on a mild background, in daylight, with captions. The task's "field" pictures show the tile
  smaller, on a busier background, under the field camera's warm light (blue dimmed, red and green raised: every
  colour shifts) and with sensor noise. The light is the same for every class: prompts inside the tower (VPT) can
  learn to see through it once, from the head classes' many images, where a linear probe learns each class's shifted
  colour from its own images. Prompts: 2 per layer, a tenth of the 17 tokens, as ViT-B/16's 20 are of its 197.
- As iNaturalist's Latin names are to CLIP, the task calls three patterns by words the tiny CLIP never saw ("tartan",
  "dapple", "lattice"): the class-name prompts carry only the colour there. The Wikipedia-style corpus describes
  every class in words CLIP knows ("a tile with red small round spots"), so training on it (the corpus step) tells
  the classifier what a tail class with two images looks like.
- CLIP puts texts and images in different regions of its space (the modality gap, as in real CLIP): a classifier
  fitted to corpus sentences must still serve images, which is what mixing the two (SFM) is for.
- The descriptors are what an LLM gives: ten per class, each in its own phrasing (none of them a caption CLIP
  trained on): three on the pattern, in words CLIP knows; two only vague about the colour ("a warm colour"); one on
  both; two non-visual (a sound, a history); two wrong (another pattern, another colour). Alone they confuse the
  colours of one warmth; among the classifier's top candidates, which mostly share the right colour, they are to
  settle the pattern, with no head bias, and the learned weights are to silence the useless ones.
Under 1.5 min on a 2-core CPU (42 to 82 s measured, as the VM's speed varied), most of it the CLIP's 300 pretraining
steps; everything follows from --seed.
"""
import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

import common

COLOURS = {"red": (215, 40, 40), "orange": (240, 140, 30), "yellow": (230, 210, 40),
           "green": (45, 165, 60), "blue": (40, 80, 215), "purple": (135, 50, 170)}
PATTERNS = {  # pattern -> (the word in the captions, a description in the captions' own words)
    "stripes": ("striped", "lines running across"), "columns": ("columned", "lines running up and down"),
    "checks": ("checked", "squares like a chess board"), "dots": ("dotted", "small round spots"),
    "slants": ("slanted", "lines running at a slant"), "grid": ("gridded", "thin lines crossing both ways"),
}
# The task names three patterns with words the tiny CLIP never saw in pretraining (like iNaturalist's Latin names
# for CLIP): zero-shot prompts carry only the colour for those.
TASK_NAMES = {"stripes": "striped", "columns": "columned", "checks": "tartan", "dots": "dapple", "slants": "slanted",
              "grid": "lattice"}
# What an LLM says about each pattern, in words CLIP knows, never in a caption's phrasing.
PATTERN_FEATURES = {
    "stripes": ["lines running across it", "covered in lines running across", "thin lines across the tile"],
    "columns": ["lines running up and down it", "covered in lines running up and down", "thin lines up and down"],
    "checks": ["squares like a chess board", "covered in squares like a chess board", "small squares in turn"],
    "dots": ["small round spots all over", "covered in small round spots", "many round spots"],
    "slants": ["lines running at a slant", "covered in lines at a slant", "thin lines at a slant"],
    "grid": ["thin lines crossing both ways", "covered in thin crossing lines", "lines crossing both ways"],
}
SOUNDS = ["a soft humming", "a sharp whistle", "a low drum beat", "a ringing bell", "a crackling fire", "rain"]
YEARS = ["1820", "1871", "1903", "1936", "1958", "1989"]
PLACES = ["old gardens", "market squares", "river banks", "school yards", "mountain huts", "harbour walls"]
CANVAS, SIZE = 64, 32  # drawn at 64 px, stored at 32 px (smooth edges)
ROWS, COLS = np.mgrid[0:CANVAS, 0:CANVAS]  # every pixel's (y, x) on the canvas
FIELD_LIGHT = ((1.0, 1.0, 0.85), (25, 10, 0))  # the field camera's warm light: blue x 0.85, red + 25, green + 10
CLIP_CONFIG = {"embed_dim": 64, "quick_gelu": True,
               "vision_cfg": {"image_size": SIZE, "layers": 3, "width": 64, "patch_size": 8, "head_width": 32},
               "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


# ---- rendering ----

def pattern_ink(pattern, phase, period=16):
    """(CANVAS, CANVAS) bool: where a pattern's ink is."""
    y, x = ROWS, COLS
    half = period // 2
    if pattern == "stripes":
        return ((y + phase) // half) % 2 == 0
    if pattern == "columns":
        return ((x + phase) // half) % 2 == 0
    if pattern == "checks":
        return (((x + phase) // half) + ((y + phase) // half)) % 2 == 0
    if pattern == "slants":
        return ((x + y + phase) // half) % 2 == 0
    if pattern == "grid":
        return (((x + phase) % period) < 4) | (((y + phase) % period) < 4)
    dy, dx = (y + phase) % period - half, (x + phase) % period - half  # dots
    return dx ** 2 + dy ** 2 < (0.3 * period) ** 2


def render(colour, pattern, rng, style):
    """One 32 px RGB image of a patterned tile. 'catalogue': CLIP's pretraining style, a big tile on a mild
    background, daylight; 'field': the long-tailed task's, a smaller tile on a busier background, under the field
    camera's warm light (FIELD_LIGHT), with sensor noise."""
    noise = rng.normal(0, 25 if style == "field" else 12, (8, 8, 3))
    bg = np.clip(rng.integers(60, 230, 3) + noise.repeat(8, 0).repeat(8, 1), 0, 255).astype(np.uint8)  # 8 x 8 blocks
    canvas = np.asarray(Image.fromarray(bg).filter(ImageFilter.GaussianBlur(2)), dtype=np.float32).copy()
    r = rng.uniform(18, 28) if style == "catalogue" else rng.uniform(16, 26)
    cx, cy = rng.uniform(r + 1, CANVAS - r - 1, 2)
    tile = np.maximum(np.abs(COLS - cx), np.abs(ROWS - cy)) < 0.85 * r
    jitter = 20 if style == "catalogue" else 30
    ink = np.clip(np.array(COLOURS[colour]) + rng.integers(-jitter, jitter + 1, 3), 0, 255)
    mask = pattern_ink(pattern, int(rng.integers(0, 16)))
    canvas[tile & mask] = ink
    canvas[tile & ~mask] = np.array([235, 235, 228]) + rng.integers(-10, 11, 3)  # the tile's pale ground
    img = np.asarray(Image.fromarray(canvas.astype(np.uint8)).resize((SIZE, SIZE), Image.LANCZOS), dtype=np.float32)
    if style == "field":
        scale, shift = FIELD_LIGHT
        img = img * np.array(scale) + np.array(shift) + rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


# ---- text: captions for pretraining, corpus and descriptors for the task ----

def captions():
    """(caption, colour or None, pattern or None): the sentences the tiny CLIP learns from."""
    out = []
    for c in COLOURS:
        for p, (word, desc) in PATTERNS.items():
            out += [(t, c, p) for t in (f"a photo of a {c} {word} tile.", f"a {c} {word} tile.",
                                        f"a tile with {c} {desc}.", f"{desc}, coloured {c}.", f"a {c} tile with {p}.")]
        out += [(t, c, None) for t in (f"a {c} tile.", f"something {c}.", f"a tile coloured {c}.")]
    for p, (word, desc) in PATTERNS.items():
        out += [(t, None, p) for t in (f"a {word} tile.", f"{desc}.", f"a tile with {p}.")]
    return out


WARM = {"red": "a warm", "orange": "a warm", "yellow": "a warm", "green": "a cool", "blue": "a cool", "purple": "a cool"}


def descriptors_for(colour, pattern, rng):
    """M = 10 descriptors as an LLM lists them, each in its own phrasing (none a caption CLIP trained on): 3 on the
    pattern, in words CLIP knows; 2 on the colour, one of them vague ("a warm colour"); 1 on both; 2 non-visual (a
    sound, a history); 2 wrong (another pattern, another colour). Returns (texts, kinds)."""
    other_colour = rng.choice([c for c in COLOURS if c != colour])
    other_pattern = rng.choice([p for p in PATTERNS if p != pattern])
    features = PATTERN_FEATURES[pattern]
    texts = [*features, f"{WARM[colour]} colour", "bright and " + WARM[colour][2:], f"{features[0]}, in {WARM[colour]} colour",
             f"a sound like {rng.choice(SOUNDS)}", f"first recorded in {rng.choice(YEARS)}",
             rng.choice(PATTERN_FEATURES[other_pattern]), f"mostly {other_colour}"]
    kinds = ["pattern"] * 3 + ["colour"] * 2 + ["visual"] + ["nonvisual"] * 2 + ["wrong"] * 2
    return [t[0].upper() + t[1:] + "." for t in texts], kinds


def wiki_text(colour, pattern, rng):
    """A Wikipedia-style page: what the class looks like in words CLIP knows (varied), then off-topic sections."""
    name = f"{colour} {TASK_NAMES[pattern]}"
    word, desc = PATTERNS[pattern]
    looks = [f"A {name} is a tile with {colour} {desc}.", f"It is coloured {colour}.", f"It has {pattern}.",
             f"The {TASK_NAMES[pattern]} is a {colour} {word} tile.", f"Seen from afar it looks like a {colour} tile.",
             f"Its colour is {colour}.", f"{desc.capitalize()}, coloured {colour}.",
             f"Every {name} is a {word} tile that is {colour}.", f"It is a {colour} {word} tile.",
             f"In pictures it is a {colour} tile with {pattern}.", f"A photo of a {name} shows a {word} tile."]
    rng.shuffle(looks)
    return (f"== {name.capitalize()} ==\n" + " ".join(looks[:6]) + "\n== Appearance ==\n" + " ".join(looks[6:])
            + f"\n== History ==\nIt was first made in {rng.choice(YEARS)}. It is found in {rng.choice(PLACES)}. Some "
            f"say it makes {rng.choice(SOUNDS)}.\n== References ==\n1. The Book of Tiles, page 12.\n")


# ---- tiny CLIP pretraining ----

def pretrain_clip(model, tokenizer, rng, steps, batch_size, log_every=100):
    """Contrastive pretraining on catalogue images. A caption that fits an image (all the attributes it names
    match) is a positive for it, so attribute-only captions do not act as false negatives."""
    classes = [(c, p) for c in COLOURS for p in PATTERNS]
    bank_per_class = 128
    print(f"rendering {len(classes) * bank_per_class} catalogue images for CLIP pretraining ...", flush=True)
    bank = torch.stack([torch.from_numpy(np.array(render(c, p, rng, "catalogue"))).permute(2, 0, 1)
                        for c, p in classes for _ in range(bank_per_class)])  # (N, 3, 32, 32) uint8
    bank_class = torch.arange(len(classes)).repeat_interleave(bank_per_class)
    caps = captions()
    tokens = tokenizer([c for c, _, _ in caps])
    fits = torch.tensor([[(cc in (None, c)) and (cp in (None, p)) for _, cc, cp in caps] for c, p in classes])
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    t0 = time.time()
    for step in range(steps):
        lr = 2e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(bank), (batch_size,), generator=gen)
        cls = bank_class[idx]
        choice = torch.multinomial(fits[cls].float(), 1, generator=gen).squeeze(1)  # one fitting caption per image
        images = (bank[idx].float() / 255 - mean) / std
        img = F.normalize(model.encode_image(images), dim=-1)
        # each distinct caption through the text tower once (a batch of 256 draws about 120 of the 216 captions):
        # the same loss (up to float rounding) for half the text compute
        uniq, where = torch.unique(choice, return_inverse=True)
        txt = F.normalize(model.encode_text(tokens[uniq]), dim=-1)[where]
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        pos = fits[cls][:, choice].float()  # (B, B): caption j fits image i
        loss = 0.5 * (-(pos / pos.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
                      - (pos.T / pos.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"clip step {step + 1}/{steps} loss {loss.item():.3f} lr {lr:.1e} "
                  f"{(step + 1) * batch_size / (time.time() - t0):.0f} pairs/s", flush=True)
    return model.eval().requires_grad_(False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/toy", help="folder to write the toy world into")
    p.add_argument("--seed", type=int, default=0, help="everything follows from this seed")
    p.add_argument("--max-per-class", type=int, default=200, help="training images of the largest class")
    p.add_argument("--imbalance", type=float, default=100.0, help="largest / smallest class size in train")
    p.add_argument("--val-per-class", type=int, default=10, help="balanced validation images per class")
    p.add_argument("--test-per-class", type=int, default=20, help="balanced test images per class")
    p.add_argument("--clip-steps", type=int, default=300, help="contrastive pretraining steps of the tiny CLIP")
    p.add_argument("--clip-batch", type=int, default=256, help="pretraining batch size")
    args = p.parse_args(argv)

    # ---- setup ----
    t0 = time.time()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    classes = [(c, p) for c in COLOURS for p in PATTERNS]
    order = rng.permutation(len(classes))  # which classes are head and which are tail is random
    num = len(classes)

    # ---- images and splits ----
    counts = [int(round(args.max_per_class * args.imbalance ** (-rank / (num - 1)))) for rank in range(num)]
    train_n = {int(order[rank]): counts[rank] for rank in range(num)}
    for split, per_class in (("train", train_n), ("val", {k: args.val_per_class for k in range(num)}),
                             ("test", {k: args.test_per_class for k in range(num)})):
        lines = []
        for label, (colour, pattern) in enumerate(classes):
            for i in range(per_class[label]):
                rel = f"images/{split}/{label:02d}_{i:03d}.png"
                (out / rel).parent.mkdir(exist_ok=True)
                render(colour, pattern, rng, "field").save(out / rel)
                lines.append(f"{rel} {label}")
        (out / f"{split}.txt").write_text("\n".join(lines) + "\n")
    names = [f"{c} {TASK_NAMES[p]}" for c, p in classes]
    (out / "classnames.txt").write_text("\n".join(names) + "\n")

    # ---- text ----
    (out / "wiki").mkdir()
    descriptors, kinds = {}, {}
    for label, (colour, pattern) in enumerate(classes):
        (out / "wiki" / f"desc_{label}.txt").write_text(wiki_text(colour, pattern, rng))
        texts, k = descriptors_for(colour, pattern, rng)
        order_m = rng.permutation(len(texts))  # planted descriptors are not in a telling order
        descriptors[names[label]] = [texts[i] for i in order_m]
        kinds[names[label]] = {texts[i]: k[i] for i in order_m}
    (out / "descriptors.json").write_text(json.dumps(descriptors, indent=1))
    (out / "descriptor_kinds.json").write_text(json.dumps(kinds, indent=1))

    # ---- tiny CLIP ----
    import open_clip
    (out / "clip").mkdir()
    config = out / "clip" / "toy-clip.json"
    config.write_text(json.dumps(CLIP_CONFIG, indent=1))
    model, _, _, name = common.load_clip(str(config), "none")
    tokenizer = open_clip.get_tokenizer(name)
    model = pretrain_clip(model, tokenizer, rng, args.clip_steps, args.clip_batch)
    common.atomic_torch_save(model.state_dict(), out / "clip" / "toy-clip.pt")

    # ---- save ----
    info = dict(seed=args.seed, classes=num, train=sum(train_n.values()), train_min=min(counts),
                train_max=max(counts), val=num * args.val_per_class, test=num * args.test_per_class,
                shot_counts=common.shot_counts(np.array([train_n[k] for k in range(num)])),
                seconds=round(time.time() - t0, 1))
    common.atomic_write_json(out / ".complete", info)
    print(f"toy world: {num} classes, {info['train']} train images ({info['train_max']} to {info['train_min']} "
          f"per class, groups {info['shot_counts']}), {info['test']} test, tiny CLIP in {info['seconds']}s -> {out}")


if __name__ == "__main__":
    common.run_script(main)
