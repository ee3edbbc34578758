"""Stage 00: the toy world, a miniature long-tailed benchmark with its own tiny CLIP (DATASET=toy only).

Writes  data/toy/ in the generic layout: images/, train.txt (long-tailed, imbalance ratio 100), val.txt and
        test.txt (balanced), classnames.txt, wiki/desc_<label>.txt, descriptors.json (M = 10 per class: 5 right
        and visual, 3 non-visual, 2 wrong), descriptor_kinds.json (which is which), clip/toy-clip.json (an open_clip
        model config) and clip/toy-clip.pt (its weights), and .complete last.

    python 00_make_toy.py --out data/toy

Classes are colour x shape (6 x 6 = 36). The tiny CLIP is pretrained contrastively on captions of "catalogue"
pictures (big shapes on plain or lightly blotched backgrounds); the task's "field" pictures put smaller,
colour-jittered shapes on blotchy, striped, noisy backgrounds. And, as iNaturalist's Latin names are to CLIP, the
task calls three of the shapes by words the tiny CLIP never saw ("disc", "wedge", "hoop"), while its Wikipedia
text and descriptors describe them in words it knows. Zero-shot CLIP is therefore useful but far from perfect,
and the corpus and the descriptors carry knowledge the class names do not. About 2 min on a 2-core CPU (the CLIP's
600 pretraining steps); everything follows from --seed.
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
from PIL import Image, ImageDraw, ImageFilter

import common

COLOURS = {"red": (215, 40, 40), "orange": (240, 140, 30), "yellow": (230, 210, 40),
           "green": (45, 165, 60), "blue": (40, 80, 215), "purple": (135, 50, 170)}
SHAPES = {  # shape -> a visual description in the captions' own words
    "circle": "a round shape with no corners", "square": "a shape with four equal sides and four corners",
    "triangle": "a shape with three corners", "bar": "a long thin flat stripe lying sideways",
    "cross": "two bars crossing in the middle like a plus sign", "ring": "a hollow circle with a hole in the middle",
}
# The task names three shapes with words the tiny CLIP never saw in pretraining (like iNaturalist's Latin names
# for CLIP): zero-shot prompts carry only the colour for those, while descriptors and Wikipedia text describe
# them in words CLIP knows ("a shape with three corners").
TASK_NAMES = {"circle": "disc", "square": "square", "triangle": "wedge", "bar": "bar", "cross": "cross",
              "ring": "hoop"}
SOUNDS = ["a soft humming", "a sharp whistle", "a low drum beat", "a ringing bell", "a crackling fire", "rain"]
SMELLS = ["fresh lemons", "wet grass", "old paper", "warm bread", "sea salt", "pine needles"]
YEARS = ["1820", "1871", "1903", "1936", "1958", "1989"]
CANVAS, SIZE = 64, 32  # drawn at 64 px, stored at 32 px (smooth edges)
CLIP_CONFIG = {"embed_dim": 64, "quick_gelu": True,
               "vision_cfg": {"image_size": SIZE, "layers": 4, "width": 96, "patch_size": 8, "head_width": 32},
               "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


# ---- rendering ----

def draw_shape(draw, shape, cx, cy, r, fill):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = 0.82 * r
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - 0.95 * r, cy + 0.75 * r), (cx + 0.95 * r, cy + 0.75 * r)], fill=fill)
    elif shape == "bar":
        draw.rectangle([cx - r, cy - 0.3 * r, cx + r, cy + 0.3 * r], fill=fill)
    elif shape == "cross":
        w = 0.32 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(3, int(0.38 * r)))


def render(colour, shape, rng, style):
    """One 32 px RGB image. 'catalogue': CLIP's pretraining style; 'field': the long-tailed task's style."""
    blotchy = style == "field" or rng.random() < 0.5
    if blotchy:  # low-frequency blotches, sometimes stripes
        noise = rng.normal(0, 25 if style == "field" else 15, (8, 8, 3))
        bg = np.clip(rng.integers(60, 230, 3) + np.kron(noise, np.ones((8, 8, 1))), 0, 255).astype(np.uint8)
        if style == "field" and rng.random() < 0.5:
            bg[::int(rng.integers(6, 14))] = rng.integers(0, 255, 3)
        img = Image.fromarray(bg).filter(ImageFilter.GaussianBlur(2))
    else:
        img = Image.new("RGB", (CANVAS, CANVAS), tuple(int(v) for v in rng.integers(0, 256, 3)))
    r, jitter = (rng.uniform(14, 26), 20) if style == "catalogue" else (rng.uniform(13, 22), 30)
    cx, cy = rng.uniform(r + 2, CANVAS - r - 2, 2)
    fill = tuple(int(np.clip(c + rng.integers(-jitter, jitter + 1), 0, 255)) for c in COLOURS[colour])
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, fill)
    img = img.resize((SIZE, SIZE), Image.LANCZOS)
    if style == "field":
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (SIZE, SIZE, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


# ---- text: captions for pretraining, corpus and descriptors for the task ----

def captions():
    """(caption, colour or None, shape or None): the sentences the tiny CLIP learns from."""
    out = []
    for c in COLOURS:
        for s, desc in SHAPES.items():
            out += [(t, c, s) for t in (f"a photo of a {c} {s}.", f"a {c} {s}.", f"a {s} that is {c}.",
                                        f"{desc}, coloured {c}.", f"a {c} {s} on a plain background.")]
        out += [(t, c, None) for t in (f"a {c} shape.", f"something {c}.", f"a shape coloured {c}.")]
    for s, desc in SHAPES.items():
        out += [(t, None, s) for t in (f"a {s}.", f"{desc}.", f"it has the form of a {s}.")]
    return out


def descriptors_for(colour, shape, rng):
    """M = 10: 5 visual and right, 3 non-visual (sound, smell, history), 2 wrong (another colour, another shape)."""
    other_colour = rng.choice([c for c in COLOURS if c != colour])
    other_shape = rng.choice([s for s in SHAPES if s != shape])
    visual = [f"A shape coloured {colour}.", f"Something {colour}.", f"{SHAPES[shape].capitalize()}.",
              f"A {shape}.", f"It has the form of a {shape}."]  # in the words CLIP knows
    nonvisual = [f"It makes a sound like {rng.choice(SOUNDS)}.", f"It smells of {rng.choice(SMELLS)}.",
                 f"It was first described in {rng.choice(YEARS)}."]
    wrong = [f"A shape coloured {other_colour}.", f"{SHAPES[other_shape].capitalize()}."]
    return visual + nonvisual + wrong, ["visual"] * 5 + ["nonvisual"] * 3 + ["wrong"] * 2


def wiki_text(colour, shape, rng):
    name = f"{colour} {TASK_NAMES[shape]}"
    return (f"== {name.capitalize()} ==\nA {name} is {SHAPES[shape]}. It is coloured {colour}. It has the form of a "
            f"{shape}. Many people know the {name} from picture books.\n== Appearance ==\nThe {TASK_NAMES[shape]} is "
            f"{colour}. Seen from afar it looks like a {colour} {shape}.\n== History ==\nIt was first drawn in "
            f"{rng.choice(YEARS)}. Some say it smells of {rng.choice(SMELLS)}.\n== References ==\n"
            "1. The Book of Shapes, page 12.\n")


# ---- tiny CLIP pretraining ----

def pretrain_clip(model, tokenizer, rng, steps, batch_size, log_every=100):
    """Contrastive pretraining on catalogue images. A caption that fits an image (all the attributes it names
    match) is a positive for it, so attribute-only captions do not act as false negatives."""
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    bank_per_class = 256
    print(f"rendering {len(classes) * bank_per_class} catalogue images for CLIP pretraining ...", flush=True)
    bank = torch.stack([torch.from_numpy(np.array(render(c, s, rng, "catalogue"))).permute(2, 0, 1)
                        for c, s in classes for _ in range(bank_per_class)])  # (N, 3, 32, 32) uint8
    bank_class = torch.arange(len(classes)).repeat_interleave(bank_per_class)
    caps = captions()
    tokens = tokenizer([c for c, _, _ in caps])
    fits = torch.tensor([[(cc in (None, c)) and (cs in (None, s)) for _, cc, cs in caps] for c, s in classes])
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    t0 = time.time()
    for step in range(steps):
        lr = 2e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(bank), (batch_size,), generator=gen)
        cls = bank_class[idx]
        # one fitting caption per image
        choice = torch.multinomial(fits[cls].float(), 1, generator=gen).squeeze(1)
        images = (bank[idx].float() / 255 - mean) / std
        flip = torch.rand(batch_size, generator=gen) < 0.5
        images[flip] = images[flip].flip(-1)
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tokens[choice]), dim=-1)
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
    p.add_argument("--clip-steps", type=int, default=600, help="contrastive pretraining steps of the tiny CLIP")
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
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    order = rng.permutation(len(classes))  # which classes are head and which are tail is random
    num = len(classes)

    # ---- images and splits ----
    counts = [int(round(args.max_per_class * args.imbalance ** (-rank / (num - 1)))) for rank in range(num)]
    train_n = {int(order[rank]): counts[rank] for rank in range(num)}
    for split, per_class in (("train", train_n), ("val", {k: args.val_per_class for k in range(num)}),
                             ("test", {k: args.test_per_class for k in range(num)})):
        lines = []
        for label, (colour, shape) in enumerate(classes):
            for i in range(per_class[label]):
                rel = f"images/{split}/{label:02d}_{i:03d}.png"
                (out / rel).parent.mkdir(exist_ok=True)
                render(colour, shape, rng, "field").save(out / rel)
                lines.append(f"{rel} {label}")
        (out / f"{split}.txt").write_text("\n".join(lines) + "\n")
    names = [f"{c} {TASK_NAMES[s]}" for c, s in classes]
    (out / "classnames.txt").write_text("\n".join(names) + "\n")

    # ---- text ----
    (out / "wiki").mkdir()
    descriptors, kinds = {}, {}
    for label, (colour, shape) in enumerate(classes):
        (out / "wiki" / f"desc_{label}.txt").write_text(wiki_text(colour, shape, rng))
        texts, k = descriptors_for(colour, shape, rng)
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
