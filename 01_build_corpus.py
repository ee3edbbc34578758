"""Stage 01: class names, the class-wise text corpus, and M descriptors per class.

Reads   DATA_ROOT (class names), optional: a VL-LTR Wikipedia folder (wiki/desc_<label>.txt), a
        VCD-style descriptors JSON ({class name: [descriptor, ...]}), a CuPL JSON ({class name: [sentence]}).
Writes  corpus.json: classnames [C], sentences [C][*], descriptors [C][<=M], meta.

    python 01_build_corpus.py --dataset places_lt --data-root data/places_lt \
        --wiki data/places_lt/wiki --descriptors data/places_lt/descriptors.json --out runs/places_lt/corpus.json

Runs in seconds on any CPU (ImageNet-LT with the VL-LTR corpus: about 10 s). No model is loaded here:
sentences are counted and truncated by the tokenizer in stage 02.
"""
import argparse
import difflib
import json
import random
import re
from collections import Counter
from pathlib import Path

import common

# Wikipedia sections that carry no description of the class (VL-LTR drops them too)
DROPPED_SECTIONS = {"external links", "references", "further reading", "bibliography", "see also", "notes"}


def article(name):
    return "an" if name[:1].lower() in "aeiou" else "a"


# ---- corpus sources ----

def template_sentences(name):
    """CLIP's 80 ImageNet prompt templates filled with the class name."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES
    return [t(name) for t in OPENAI_IMAGENET_TEMPLATES]


def read_wiki_file(path):
    """One VL-LTR desc_<label>.txt: UTF-8 (GBK fallback), '==' lines are headings, split into sentences."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("gbk", errors="replace")
    sentences, keep = [], True
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("=="):
            keep = line.strip("= ").lower() not in DROPPED_SECTIONS
            continue
        if keep and line:
            sentences += [s.strip() for s in re.split(r"(?<=[.!?])\s+", line) if len(s.strip()) > 3]
    return sentences


def wiki_sentences(folder, num_classes):
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: Wikipedia folder not found (expected wiki/desc_<label>.txt files)")
    out, missing = [], []
    for c in range(num_classes):
        path = folder / f"desc_{c}.txt"
        if path.exists():
            out.append(read_wiki_file(path))
        else:
            out.append([])
            missing.append(c)
    if missing:
        print(f"note: {len(missing)} classes have no {folder}/desc_<label>.txt (first: {missing[:5]})")
    return out


# ---- mapping JSON keys (class names) to labels ----

def normalise_name(name):
    """Matching ignores case, '_', '-', '/' and a parenthesised suffix: 'Swimming_pool (indoor)' -> 'swimming pool'."""
    name = re.sub(r"\s*\([^)]*\)\s*$", "", name.strip().lower())
    return re.sub(r"\s+", " ", re.sub(r"[_/\-]", " ", name)).strip()


def map_names_to_labels(keys, classnames, aliases, source):
    """{json key: [labels]}. Several labels share a key when class names repeat (ImageNet)."""
    by_name = {}
    for label, name in enumerate(classnames):
        by_name.setdefault(normalise_name(name), []).append(label)
    aliases = {normalise_name(k): normalise_name(v) for k, v in aliases.items()}
    mapping, unmatched = {}, []
    for key in keys:
        norm = aliases.get(normalise_name(key), normalise_name(key))
        if norm in by_name:
            mapping[key] = by_name[norm]
        else:
            unmatched.append(key)
    if unmatched:
        lines = []
        for key in unmatched[:30]:
            near = difflib.get_close_matches(normalise_name(key), list(by_name), n=3, cutoff=0.5)
            lines.append(f"  {key!r}: nearest class names {near or 'none'}")
        more = f"\n  ... and {len(unmatched) - 30} more" if len(unmatched) > 30 else ""
        raise SystemExit(f"{source}: {len(unmatched)} names match no class name:\n" + "\n".join(lines) + more +
                         "\nGive an alias map ({\"name in the file\": \"class name\"}) with --aliases.")
    return mapping


def read_named_json(path, classnames, aliases):
    """A {class name: [sentences]} file (VCD descriptors, CuPL) as [C][*], mapped by name, never by order."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected {{class name: [sentences]}}, got {type(data).__name__}")
    per_class = [[] for _ in classnames]
    for key, labels in map_names_to_labels(list(data), classnames, aliases, path).items():
        if not isinstance(data[key], list):
            raise SystemExit(f"{path}: value of {key!r} is not a list")
        for label in labels:
            per_class[label] += [str(s).strip() for s in data[key] if str(s).strip()]
    return per_class


def descriptor_sentence(name, descriptor):
    """Sentences stay as they are; VCD-style phrases ('a long neck') become VCD's '{c}, which has ...'."""
    if len(descriptor.split()) >= 6 or descriptor[:1].isupper():
        return descriptor
    verb = "" if descriptor.split()[0] in ("is", "has", "have", "are", "can", "was") else "has "
    return f"a photo of {article(name)} {name}, which {verb}{descriptor}."


def balance(per_class, n, rng):
    """Every class gets exactly n sentences: subsample long lists, resample short ones with replacement."""
    out = []
    for sentences in per_class:
        if not sentences or len(sentences) == n:
            out.append(list(sentences))
        elif len(sentences) > n:
            out.append(rng.sample(sentences, n))
        else:
            out.append(list(sentences) + rng.choices(sentences, k=n - len(sentences)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="imagenet_lt, places_lt, inat2018, or any name (generic layout)")
    p.add_argument("--data-root", required=True, help="dataset root (class names are read from here)")
    p.add_argument("--out", required=True, help="corpus.json to write")
    p.add_argument("--templates", action=argparse.BooleanOptionalAction, default=True,
                   help="add CLIP's 80 prompt templates per class to the corpus (paper: CoOp-style prompts; on)")
    p.add_argument("--wiki", default="", help="folder of VL-LTR desc_<label>.txt Wikipedia files (paper: on)")
    p.add_argument("--cupl", default="", help="CuPL JSON {class name: [sentences]} added to the corpus")
    p.add_argument("--descriptors", default="", help="VCD-style JSON {class name: [descriptors]}")
    p.add_argument("--aliases", default="", help="JSON {name in a JSON file: class name} for names that do not match")
    p.add_argument("--num-descriptors", type=int, default=10, help="M descriptors kept per class (paper: 10)")
    p.add_argument("--per-class", type=int, default=100,
                   help="balance the corpus to this many sentences per class, 0 = keep all (paper: balanced, "
                        "count not given; kit: 100)")
    p.add_argument("--llm-model", default="", help="ask an LLM for descriptors (not in this version of the kit)")
    p.add_argument("--seed", type=int, default=0, help="seed for balancing")
    args = p.parse_args(argv)

    # ---- setup ----
    rng = random.Random(args.seed)
    classnames = common.class_names(args.dataset, args.data_root)
    num_classes = len(classnames)
    aliases = json.loads(Path(args.aliases).read_text()) if args.aliases else {}

    # ---- corpus ----
    sources = {}
    if args.templates:
        sources["templates"] = [template_sentences(n) for n in classnames]
    if args.wiki:
        sources["wiki"] = wiki_sentences(args.wiki, num_classes)
    if args.cupl:
        sources["cupl"] = read_named_json(args.cupl, classnames, aliases)
    if not sources:
        raise SystemExit("no corpus source: keep --templates on, or give --wiki or --cupl")
    merged = [sum((src[c] for src in sources.values()), []) for c in range(num_classes)]
    empty = [classnames[c] for c in range(num_classes) if not merged[c]]
    if empty:
        raise SystemExit(f"{len(empty)} classes have no corpus sentence (e.g. {empty[:5]}); add --templates")
    if args.per_class:
        merged = balance(merged, args.per_class, rng)

    # ---- descriptors ----
    if args.llm_model:
        raise SystemExit("--llm-model: asking an LLM is not built yet; import descriptors with --descriptors")
    if not args.descriptors:
        raise SystemExit("no descriptor source: give --descriptors FILE.json (VCD-style {class name: [descriptors]}, "
                         "e.g. from 'Visual Classification via Description' or CuPL). Make: DESCRIPTORS=FILE.json")
    raw = read_named_json(args.descriptors, classnames, aliases)
    descriptors, short = [], []
    for c, name in enumerate(classnames):
        kept = list(dict.fromkeys(raw[c]))[:args.num_descriptors]  # drop repeats, keep order
        if len(kept) < args.num_descriptors:
            short.append((name, len(kept)))
        if not kept:  # e.g. VCD's Places365 file has an empty list for corn_field
            kept = [f"a photo of {article(name)} {name}."]
        descriptors.append([descriptor_sentence(name, d) for d in kept])
    if short:
        print(f"note: {len(short)} classes have fewer than {args.num_descriptors} descriptors: "
              + ", ".join(f"{n} ({k})" for n, k in short[:10]) + (" ..." if len(short) > 10 else ""))

    # ---- save ----
    per_source = {name: dict(Counter(len(s) for s in src).most_common(3)) for name, src in sources.items()}
    summary = {name: {"sentences": sum(len(s) for s in src),
                      "min_per_class": min(len(s) for s in src), "max_per_class": max(len(s) for s in src)}
               for name, src in sources.items()}
    meta = common.make_meta("01_build_corpus", args, dataset=args.dataset, num_classes=num_classes,
                            sources=summary, per_class_lengths=per_source,
                            classes_short_of_descriptors=[n for n, _ in short])
    common.atomic_write_json(args.out, dict(classnames=classnames, sentences=merged, descriptors=descriptors,
                                            meta=meta))
    total = sum(len(s) for s in merged)
    print(f"corpus: {num_classes} classes, {total} sentences from {', '.join(sources)}, "
          f"{sum(len(d) for d in descriptors)} descriptors -> {args.out}")


if __name__ == "__main__":
    main()
