"""Stage 00: the toy world, a miniature long-tailed benchmark with its own tiny CLIP (DATASET=toy only).

Reads   toy_clip/toy-clip.safetensors (the tiny CLIP, pretrained once by 00_pretrain_toy_clip.py and committed; its
        digest is checked here).
Writes  data/toy/ in the generic layout: images/, train.txt (long-tailed, imbalance ratio 100), val.txt and test.txt
        (balanced), classnames.txt, wiki/desc_<label>.txt, descriptors.json (M = 10 per class, written the way an LLM
        answers), descriptor_kinds.json (which descriptor is which kind), clip/toy-clip.json and
        clip/toy-clip.safetensors (the tiny CLIP as open_clip loads it, expanded with numpy: this stage imports no
        torch), and .complete last (a digest of every file written). A file that would come out the same is left alone,
        so running the stage again changes nothing downstream.

    python 00_make_toy.py --out data/toy

The world, part by part, with the job each part of HLC has in it (docs/toy-world.md says what came out):
- Classes are patterned tiles, colour x pattern (6 x 6 = 36), 200 down to 2 training images per class (imbalance ratio
  100; which classes are head or tail is random), 10 val and 20 test images per class: logit adjustment has the head
  bias of any long tail to remove.
- The tiny CLIP learnt its 10 colours and 9 patterns from a catalogue (toyworld.py, toy_clip/), half of it in
  daylight and half as web photos in every light, colour balance and noise (toyworld.WebCamera), and names them all on
  catalogue pictures. The task's pictures come from a field camera (toyworld.FieldCamera): a warm cast the same for
  every picture, light that varies, heavy sensor noise, and what the CLIP never saw: the tile smaller in the frame and
  dull leaves lying on it. Prompts inside the tower (VPT) learn to see through it once, from the head classes' many
  pictures, where a linear probe learns each class from that class's own pictures.
- As iNaturalist's Latin names are to CLIP, the task calls three patterns by words the CLIP never read ("tartan",
  "dapple", "lattice"): their class-name prompts carry only the colour. The Wikipedia-style corpus describes every
  class in words CLIP knows, in many phrasings, so training on it (the corpus step) tells the classifier what a tail
  class looks like.
- CLIP's texts and pictures sit in different regions of its space (the modality gap), which mixing them (SFM) spans.
- The descriptors are what an LLM gives: ten sentences per class, three on the pattern in words CLIP knows, two vague
  about the colour, one on both, two that no picture shows (a sound, a history) and two wrong (another pattern,
  another colour); the learned weights are to silence the useless ones.
3 to 14 s on a 2-core CPU, by machine; everything follows from --seed.
"""
import argparse
import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np

import basics
import toyworld

# The task's names: three patterns by words the tiny CLIP never read (as iNaturalist's Latin names are to CLIP)
TASK_NAMES = {"stripes": "striped", "columns": "columned", "checks": "tartan", "dots": "dapple", "slants": "slanted",
              "grid": "lattice"}
# What an LLM says of each pattern, in words CLIP knows, never in a caption's phrasing
PATTERN_FEATURES = {
    "stripes": ["Lines running across it.", "It is covered in bands running across.", "Thin lines across the tile."],
    "columns": ["Lines running up and down it.", "It is covered in bands running up and down.",
                "Thin lines up and down the tile."],
    "checks": ["Squares like a chess board.", "It is covered in squares of two colours in turn.",
               "Small squares in turn across the tile."],
    "dots": ["Small round spots all over it.", "It is covered in round spots in rows.",
             "Many round spots on the tile."],
    "slants": ["Lines running at a slant across it.", "It is covered in bands running at a slant.",
               "Thin lines at a slant across the tile."],
    "grid": ["Thin lines crossing both ways.", "It is covered in thin lines crossing like a net.",
             "Lines crossing both ways on the tile."],
}
SOUNDS = ["a soft humming", "a sharp whistle", "a low drum beat", "a ringing bell", "a crackling fire", "rain"]
YEARS = ["1820", "1871", "1903", "1936", "1958", "1989"]
PLACES = ["old gardens", "market squares", "river banks", "school yards", "mountain huts", "harbour walls"]
CAMERA = toyworld.FieldCamera()


# ---- text ----

def descriptors_for(colour, pattern, rng):
    """M = 10 descriptors as an LLM lists them, each a sentence the kit's VCD rule turns into '{class}, which ...':
    3 on the pattern, 2 vague about the colour, 1 on both, 2 that no picture shows, 2 wrong. Returns (texts, kinds)."""
    other_colour = rng.choice([c for c in toyworld.TASK_COLOURS if c != colour])
    other_pattern = rng.choice([p for p in toyworld.TASK_PATTERNS if p != pattern])
    warmth = toyworld.WARMTH[colour]
    features = PATTERN_FEATURES[pattern]
    texts = [*features, f"A {warmth} colour.", f"It looks {warmth} and bright.",
             f"{colour.capitalize()} {features[0][0].lower()}{features[0][1:]}",  # on both colour and pattern
             f"It makes a sound like {rng.choice(SOUNDS)} when the wind blows over it.",
             f"It was first made by hand in {rng.choice(PLACES)} in {rng.choice(YEARS)}.",
             str(rng.choice(PATTERN_FEATURES[other_pattern])), f"It is mostly {other_colour}."]
    kinds = ["pattern"] * 3 + ["colour"] * 2 + ["visual"] + ["nonvisual"] * 2 + ["wrong"] * 2
    return texts, kinds


LOOKS = [  # how a Wikipedia page says what a class looks like: {n} the class, {w} its name's pattern word, {c} the
          # colour, {d} a description of the pattern, {a} its adjective, {s} its noun, {t} the colour's warmth
    "A {n} is a tile with {c} {d}.", "It has {c} {d}.", "It is covered in {d}, coloured {c}.",
    "The {w} is a {c} {a} tile.", "Seen from afar it looks {c}.", "Its colour is {c}.", "It is a {c} tile with {s}.",
    "In pictures it is a {c} {a} tile.", "A photo of a {n} shows {c} {d}.", "Its {d} are what people see first.",
    "Like every {w}, it has {d}.", "It is a tile in a {t} colour.", "Every {n} is a tile that is {c} and {a}.",
    "{D}, coloured {c}.", "It is a {c} {a} tile.", "The tile has {s} all over.", "Its marks are {c}.",
    "The {n} shows {d} on a pale ground.", "It is known for its {c} {d}.", "Most {n} tiles look {c} and {a}.",
]
OFF_TOPIC = ["It was first made in {y}.", "It is found in {p}.", "Some say it makes {sound}.", "Makers sell it in {p}.",
             "The name comes from an old word.", "It was popular in {y}.", "A museum in {p} keeps one.",
             "It is cheap to make.", "Children like it.", "It appears in a famous song."]


def wiki_text(colour, pattern, rng):
    """A Wikipedia-style page: what the class looks like, in words CLIP knows and in many phrasings, then sections
    no picture shows (history, places, sounds) and references, which stage 01 drops."""
    name, (adj, descs) = f"{colour} {TASK_NAMES[pattern]}", toyworld.PATTERNS[pattern]
    looks = []
    for template in LOOKS:
        for d in descs:
            looks.append(template.format(n=name, w=TASK_NAMES[pattern], c=colour, d=d, D=d.capitalize(), a=adj,
                                         s=toyworld.NOUNS[pattern], t=toyworld.WARMTH[colour]))
    looks = list(dict.fromkeys(looks))  # templates without {d} come once
    rng.shuffle(looks)
    other = [t.format(y=rng.choice(YEARS), p=rng.choice(PLACES), sound=rng.choice(SOUNDS)) for t in OFF_TOPIC]
    half = len(looks) // 2
    return (f"== {name.capitalize()} ==\n" + " ".join(looks[:half]) + "\n== Appearance ==\n" + " ".join(looks[half:])
            + "\n== History ==\n" + " ".join(other) + "\n== References ==\n1. The Book of Tiles, page 12.\n")


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/toy", help="folder to write the toy world into (one this stage made, or new)")
    p.add_argument("--seed", type=basics.seed_value, default=0, help="everything follows from this seed")
    p.add_argument("--clip", default=str(Path(__file__).resolve().parent / "toy_clip" / "toy-clip.safetensors"),
                   help="the tiny CLIP's compact weights (00_pretrain_toy_clip.py; default: the kit's own, in "
                        "toy_clip/, wherever the script is run from)")
    p.add_argument("--max-per-class", type=int, default=200, help="training images of the largest class")
    p.add_argument("--imbalance", type=float, default=100.0, help="largest / smallest class size in train")
    p.add_argument("--val-per-class", type=int, default=10, help="balanced validation images per class")
    p.add_argument("--test-per-class", type=int, default=20, help="balanced test images per class")
    args = p.parse_args(argv)

    # ---- setup: the folder must be one this stage made (or new), and the CLIP the committed one ----
    t0 = time.time()
    out = basics.claim_folder(args.out, "00_make_toy.py", legacy=(".complete", "clip/toy-clip.json"))
    compact = toyworld.read_clip(args.clip)
    rng = np.random.default_rng(args.seed)
    classes = [(c, p) for c in toyworld.TASK_COLOURS for p in toyworld.TASK_PATTERNS]
    names = [f"{c} {TASK_NAMES[p]}" for c, p in classes]
    num = len(classes)
    order = rng.permutation(num)  # which classes are head and which are tail is random
    written = {}  # relative path -> sha1 of its bytes

    def write(rel, data):
        data = data.encode("utf-8") if isinstance(data, str) else data
        basics.write_if_changed(out / rel, data)
        written[rel] = hashlib.sha1(data).hexdigest()

    # ---- images and splits ----
    counts = [int(round(args.max_per_class * args.imbalance ** (-rank / (num - 1)))) for rank in range(num)]
    train_n = {int(order[rank]): counts[rank] for rank in range(num)}
    for split, per_class in (("train", train_n), ("val", {k: args.val_per_class for k in range(num)}),
                             ("test", {k: args.test_per_class for k in range(num)})):
        lines = []
        for label, (colour, pattern) in enumerate(classes):
            for i in range(per_class[label]):
                rel = f"images/{split}/{label:02d}_{i:03d}.png"
                write(rel, png_bytes(toyworld.render(colour, pattern, rng, CAMERA)))
                lines.append(f"{rel} {label}")
        write(f"{split}.txt", "\n".join(lines) + "\n")
    write("classnames.txt", "\n".join(names) + "\n")

    # ---- text ----
    descriptors, kinds = {}, {}
    for label, (colour, pattern) in enumerate(classes):
        write(f"wiki/desc_{label}.txt", wiki_text(colour, pattern, rng))
        texts, k = descriptors_for(colour, pattern, rng)
        order_m = rng.permutation(len(texts))  # planted descriptors are not in a telling order
        descriptors[names[label]] = [texts[i] for i in order_m]
        kinds[names[label]] = {texts[i]: k[i] for i in order_m}
    write("descriptors.json", json.dumps(descriptors, indent=1))
    write("descriptor_kinds.json", json.dumps(kinds, indent=1))

    # ---- the tiny CLIP, as open_clip loads it ----
    write("clip/toy-clip.json", json.dumps(toyworld.CLIP_CONFIG, indent=1) + "\n")
    write("clip/toy-clip.safetensors", toyworld.safetensors_bytes(toyworld.expand_clip(compact)))

    # ---- save: files of an earlier world that this one does not have go, then .complete ----
    done = out / ".complete"
    before = basics.read_json(done).get("files", {}) if done.exists() else {}
    for rel in set(before) - set(written):
        (out / rel).unlink(missing_ok=True)
    info = dict(seed=args.seed, classes=num, train=sum(train_n.values()), train_min=min(counts),
                train_max=max(counts), val=num * args.val_per_class, test=num * args.test_per_class,
                shot_counts=basics.shot_counts(np.array([train_n[k] for k in range(num)])),
                clip=toyworld.clip_digest(args.clip), files=dict(sorted(written.items())))
    changed = basics.write_if_changed(done, json.dumps(info, indent=1) + "\n")
    print(f"toy world: {num} classes, {info['train']} train images ({info['train_max']} to {info['train_min']} per "
          f"class, groups {info['shot_counts']}), {info['test']} test, in {time.time() - t0:.1f}s -> {out}"
          + ("" if changed else " (unchanged)"))


if __name__ == "__main__":
    basics.run_script(main)
