"""Stage 01: class names, the class-wise text corpus, and M descriptors per class.

Reads   DATA_ROOT (class names), optional: a VL-LTR Wikipedia folder (wiki/desc_<label>.txt), a
        VCD-style descriptors JSON ({class name: [descriptor, ...]}), a CuPL JSON ({class name: [sentence]}).
Writes  corpus.json: classnames [C], sentences [C][*], descriptors [C][<=M], meta.

    python 01_build_corpus.py --dataset places_lt --data-root data/places_lt \
        --wiki data/places_lt/wiki --descriptors data/places_lt/descriptors.json --out runs/places_lt/corpus.json

Runs in about a second for the toy world on a 2-core CPU; with --llm-model the time is the LLM's (answers are
cached in llm_cache.jsonl as they arrive). No model is loaded here: sentences are counted and truncated by the
tokenizer in stage 02.
"""
import argparse
import difflib
import json
import os
import random
import re
from pathlib import Path

import common
import llm

# Wikipedia sections that carry no description of the class (VL-LTR drops them too)
DROPPED_SECTIONS = {"external links", "references", "further reading", "bibliography", "see also", "notes"}


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
    return f"a photo of {llm.article(name)} {name}, which {verb}{descriptor}."


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


def ask_llm(args, classnames):
    """Descriptors (and CuPL sentences) from a chat model, through the on-disk answer cache."""
    cache = llm.Cache(args.llm_cache or Path(args.out).with_name("llm_cache.jsonl"))
    jobs = llm.plan_requests(classnames, args.llm_model, cache, args.num_descriptors, args.cupl_answers)
    missing = sum(not cached for _, cached in jobs)
    if args.dry_run:
        raise SystemExit(f"dry run: {len(jobs)} first requests for {len(classnames)} classes, {len(jobs) - missing} "
                         f"cached, {missing} to ask {args.llm_model} at {args.llm_base_url} (plus re-asks for answers "
                         f"with fewer than {args.num_descriptors} items)")
    client = llm.ChatClient(args.llm_base_url, args.llm_model, args.llm_key, args.llm_temperature, args.llm_timeout,
                           backoff=args.llm_backoff)
    print(f"asking {args.llm_model} at {args.llm_base_url}: {missing} of {len(jobs)} requests not cached "
          f"({cache.path})")
    asked = llm.generate(classnames, client, cache, args.num_descriptors, args.cupl_answers, args.llm_concurrency,
                         args.llm_max_asks, args.llm_question)
    print(f"llm: {asked['requests']} requests, {asked['stats']['cached']} answers from the cache")
    if asked["failures"]:
        print(f"warning: {len(asked['failures'])} classes got no answer: " + "; ".join(asked["failures"][:5]))
    if asked["short"]:
        print(f"warning: {len(asked['short'])} classes have fewer than {args.num_descriptors} descriptors after "
              f"{args.llm_max_asks} answers: {', '.join(asked['short'][:10])}")
    return asked


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
    p.add_argument("--llm-model", default="", help="ask this chat model for the descriptors (paper: gpt-3.5-turbo); "
                                                   "naming one turns the LLM on")
    p.add_argument("--llm-base-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
                   help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, else OpenAI)")
    p.add_argument("--llm-key", default=os.environ.get("OPENAI_API_KEY", ""),
                   help="API key (default: $OPENAI_API_KEY); never written to disk or logs")
    p.add_argument("--llm-temperature", type=float, default=0.7, help="sampling temperature (paper: not given)")
    p.add_argument("--llm-concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--llm-timeout", type=float, default=60.0, help="seconds before a request is retried")
    p.add_argument("--llm-backoff", type=float, default=1.0, help="first retry wait in seconds, doubled each retry")
    p.add_argument("--llm-max-asks", type=int, default=3, help="answers asked per class when one has fewer than M items")
    p.add_argument("--llm-question", default=llm.DESCRIPTOR_QUESTION,
                   help="descriptor question; {m} = M, {c} = class name, {a} = a/an (paper: the default)")
    p.add_argument("--cupl-answers", type=int, default=0,
                   help="with --llm-model: answers per CuPL question (5 questions) added to the corpus; 0 = none")
    p.add_argument("--llm-cache", default="", help="answer cache (JSONL; default: llm_cache.jsonl next to --out)")
    p.add_argument("--dry-run", action="store_true", help="print how many LLM requests this run would make, then stop")
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
    asked = ask_llm(args, classnames) if args.llm_model else None
    if asked and args.cupl_answers:
        sources["cupl_llm"] = asked["cupl"]
    if not sources:
        raise SystemExit("no corpus source: keep --templates on, or give --wiki or --cupl")
    merged = [sum((src[c] for src in sources.values()), []) for c in range(num_classes)]
    empty = [classnames[c] for c in range(num_classes) if not merged[c]]
    if empty:
        raise SystemExit(f"{len(empty)} classes have no corpus sentence (e.g. {empty[:5]}); add --templates")
    if args.per_class:
        merged = balance(merged, args.per_class, rng)

    # ---- descriptors ----
    if asked:
        raw = asked["descriptors"]
        if args.descriptors:
            print(f"note: descriptors come from {args.llm_model}; {args.descriptors} is not used")
    elif args.descriptors:
        raw = read_named_json(args.descriptors, classnames, aliases)
    else:
        raise SystemExit("no descriptor source: give --descriptors FILE.json (VCD-style {class name: [descriptors]}, "
                         "e.g. from 'Visual Classification via Description' or CuPL; Make: DESCRIPTORS=FILE.json), "
                         "or ask an LLM with --llm-model NAME (Make: LLM_MODEL=NAME; key in OPENAI_API_KEY)")
    descriptors, short = [], []
    for c, name in enumerate(classnames):
        kept = list(dict.fromkeys(raw[c]))[:args.num_descriptors]  # drop repeats, keep order
        if len(kept) < args.num_descriptors:
            short.append((name, len(kept)))
        if not kept:  # e.g. VCD's Places365 file has an empty list for corn_field
            kept = [f"a photo of {llm.article(name)} {name}."]
        descriptors.append([descriptor_sentence(name, d) for d in kept])
    if short:
        print(f"note: {len(short)} classes have fewer than {args.num_descriptors} descriptors: "
              + ", ".join(f"{n} ({k})" for n, k in short[:10]) + (" ..." if len(short) > 10 else ""))

    # ---- save ----
    summary = {name: {"sentences": sum(len(s) for s in src), "min_per_class": min(len(s) for s in src),
                      "median_per_class": sorted(len(s) for s in src)[num_classes // 2],
                      "max_per_class": max(len(s) for s in src)} for name, src in sources.items()}
    for name, row in summary.items():
        print(f"source {name}: {row['sentences']} sentences, per class min {row['min_per_class']} / median "
              f"{row['median_per_class']} / max {row['max_per_class']}")
    per_class = {name: [len(s) for s in src] for name, src in sources.items()}
    llm_meta = None
    if asked:
        llm_meta = dict(model=args.llm_model, base_url=args.llm_base_url, requests=asked["requests"],
                        stats=asked["stats"], short=asked["short"], failures=asked["failures"])
    meta = common.make_meta("01_build_corpus", args, dataset=args.dataset, num_classes=num_classes,
                            sources=summary, per_class_sentences=per_class, balanced_to=args.per_class or None,
                            classes_short_of_descriptors=[n for n, _ in short], llm=llm_meta)
    common.atomic_write_json(args.out, dict(classnames=classnames, sentences=merged, descriptors=descriptors,
                                            meta=meta))
    total = sum(len(s) for s in merged)
    print(f"corpus: {num_classes} classes, {total} sentences from {', '.join(sources)}, "
          f"{sum(len(d) for d in descriptors)} descriptors -> {args.out}")


if __name__ == "__main__":
    main()
