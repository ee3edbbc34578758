"""Stage 01: class names, the class-wise text corpus, and M descriptors per class.

Reads   DATA_ROOT (class names; the split files must be there), optional: a VL-LTR Wikipedia folder
        (wiki/desc_<label>.txt), a VCD-style descriptors JSON ({class name: [descriptor, ...]}), a CuPL JSON
        ({class name: [sentence]}), or answers from a chat model.
Writes  corpus.json: classnames [C], sentences [C][*], descriptors [C][<=M] (each a sentence that names its
        class), descriptors_raw (the same as the source wrote them), meta (what each source gave, per class, and
        the digests the next stages check).

    python 01_build_corpus.py --dataset places_lt --data-root data/places_lt \
        --wiki data/places_lt/wiki --descriptors data/places_lt/descriptors.json --out runs/places_lt/corpus.json

Runs in 0.3 s for the toy world on a 2-core CPU (it imports no torch: basics.py); with --llm-model the time is the
LLM's (answers are cached in llm_cache.jsonl as they arrive). No model is loaded here: sentences are counted and
truncated by the tokenizer in stage 02.
"""
import argparse
import difflib
import os
import random
import re
import urllib.parse
from pathlib import Path

import basics
import llm

# Wikipedia sections that carry no description of the class (VL-LTR drops them too)
DROPPED_SECTIONS = {"external links", "references", "further reading", "bibliography", "see also", "notes"}


# ---- corpus sources ----

def template_sentences(name):
    """CLIP's 80 ImageNet prompt templates filled with the class name."""
    return [t(name) for t in basics.open_clip_metadata().OPENAI_IMAGENET_TEMPLATES]


def read_wiki_file(path):
    """One VL-LTR desc_<label>.txt: UTF-8 (GBK fallback), '==' lines are headings, split into sentences."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
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
        raise FileNotFoundError(f"{folder}: Wikipedia folder not found{basics.missing_hint(folder)} (expected "
                                "wiki/desc_<label>.txt files)")
    out, missing = [], []
    for c in range(num_classes):
        path = folder / f"desc_{c}.txt"
        if path.exists():
            out.append(read_wiki_file(path))
        else:
            out.append([])
            missing.append(c)
    if len(missing) == num_classes:  # a wrong folder, not a sparse corpus
        held = sorted(p.name for p in folder.iterdir())
        raise SystemExit(f"{folder}: no desc_<label>.txt for any of the {num_classes} classes (the folder holds "
                         f"{', '.join(held[:5]) + (' ...' if len(held) > 5 else '') if held else 'nothing'}); "
                         "give the folder of VL-LTR's desc_0.txt, desc_1.txt, ... (WIKI=, --wiki)")
    if missing:
        print(f"note: {len(missing)} classes have no {folder}/desc_<label>.txt (first: {missing[:5]})")
    return out


# ---- mapping JSON keys (class names) to labels ----

def normalise_name(name, drop_suffix=False):
    """Matching ignores case, a Places365 '/a/' prefix, '_', '-' and '/'; with drop_suffix also a parenthesised
    suffix: '/s/swimming_pool/indoor' and 'swimming_pool-indoor' -> 'swimming pool indoor',
    'arcade (passageway)' -> 'arcade'."""
    name = re.sub(r"^/[a-z]/", "", name.strip().lower())
    if drop_suffix:
        name = re.sub(r"\s*\([^)]*\)\s*$", "", name)
    return re.sub(r"\s+", " ", re.sub(r"[_/\-]", " ", name)).strip()


def map_names_to_labels(keys, classnames, aliases, source):
    """({key: [labels]}, report). A key (or its alias: a class name or a class index) names one class; a name that
    several classes share (ImageNet's 'missile', 657 and 744) fills those of them that no other key of the file
    claimed, so VCD's 'projectile' (aliased to 744) leaves 'missile' to 657 alone, while CuPL's one 'missile' list
    fills both, as in CuPL's own code; every such sharing is reported. A key that names no class stops the run,
    unless every class has a key of its own (a file for more classes than the dataset's): then it is left out."""
    by_name, by_stem = {}, {}
    for label, name in enumerate(classnames):
        by_name.setdefault(normalise_name(name), []).append(label)
        by_stem.setdefault(normalise_name(name, drop_suffix=True), []).append(label)
    aliases = {normalise_name(k): v for k, v in aliases.items()}

    def resolve(key):
        target = aliases.get(normalise_name(key), key)
        if isinstance(target, bool) or not isinstance(target, (int, str, list)):
            raise SystemExit(f"alias of {key!r}: {target!r} is neither a class name nor a class index")
        if isinstance(target, (int, list)):
            labels = [target] if isinstance(target, int) else target
            bad = [t for t in labels if not isinstance(t, int) or not 0 <= t < len(classnames)]
            if bad:
                raise SystemExit(f"alias of {key!r}: class index {bad[0]!r} is outside [0, {len(classnames)})")
            return labels, True
        return by_name.get(normalise_name(target)) or by_stem.get(normalise_name(target, drop_suffix=True)), False

    resolved = {key: resolve(key) for key in keys}
    unmatched = [key for key, (labels, _) in resolved.items() if not labels]
    if unmatched and covers_every_class_alone(resolved, len(classnames)):
        # a file for more classes than this dataset's (VCD's ImageNet file for a subset of ImageNet): every class has
        # a key of its own, so the names left over are other classes', not this dataset's names misspelt
        shown = ", ".join(repr(k) for k in unmatched[:5]) + (", ..." if len(unmatched) > 5 else "")
        print(f"note: {source}: {len(unmatched)} of its {len(keys)} names are no class of this dataset and are left "
              f"out ({shown}); every class has an entry of its own")
        resolved = {key: value for key, value in resolved.items() if value[0]}
    elif unmatched:
        filled = {label for labels, _ in resolved.values() if labels for label in labels}
        missing = [c for c in range(len(classnames)) if c not in filled]
        if missing and len(unmatched) > len(missing):  # a file for more classes: name the classes it misses
            left = {normalise_name(k): k for k in unmatched}
            lines = [f"  class {c} {classnames[c]!r}: nearest names in the file {nearest(classnames[c], left)}"
                     for c in missing[:30]]
            head = (f"no entry for {len(missing)} of the {len(classnames)} classes "
                    f"({len(unmatched)} names match no class)")
            more = len(missing) - 30
        else:
            names = {n: n for n in by_name}
            lines = [f"  {key!r}: nearest class names {nearest(key, names)}" for key in unmatched[:30]]
            head, more = f"{len(unmatched)} names match no class name", len(unmatched) - 30
        raise SystemExit(f"{source}: {head}:\n" + "\n".join(lines) + (f"\n  ... and {more} more" if more > 0 else "")
                         + "\nGive an alias map with --aliases: {\"name in the file\": \"class name\" or class index}.")
    claimed = {label for labels, explicit in resolved.values() if explicit or len(labels) == 1 for label in labels}
    mapping, shared = {}, {}
    for key, (labels, explicit) in resolved.items():
        if not explicit and len(labels) > 1:  # a repeated class name: the classes no other key took
            labels = [label for label in labels if label not in claimed] or labels
            if len(labels) > 1:
                shared[key] = labels
        mapping[key] = labels
    filled = {label for labels in mapping.values() for label in labels}
    report = dict(keys=len(keys), classes_matched=len(filled), classes_without_entry=len(classnames) - len(filled),
                  keys_left_out=unmatched,
                  shared_keys={k: v for k, v in shared.items()},
                  merged_classes=sorted({label for label in filled
                                         if sum(label in labels for labels in mapping.values()) > 1}))
    return mapping, report


def nearest(name, candidates):
    """Up to three of {normalised name: name shown} closest to name, for an error message ('none' if none is)."""
    return [candidates[n] for n in difflib.get_close_matches(normalise_name(name), list(candidates), 3, 0.5)] or "none"


def covers_every_class_alone(resolved, num_classes):
    """Whether the keys that name a class fill every class, each class by a key that names it alone. Only then may
    the names that fit no class be left out: a class with no entry, or one a shared name fills (the ImageNet
    'missile' that 'projectile' should have taken), may be what a misspelt name was for."""
    alone = [labels for labels, explicit in resolved.values() if labels and (explicit or len(labels) == 1)]
    return {label for labels in alone for label in labels} == set(range(num_classes)) and \
        len(alone) == sum(bool(labels) for labels, _ in resolved.values())


def read_named_json(path, classnames, aliases, what="{class name: [sentences]} file"):
    """A {class name: [sentences]} file (VCD descriptors, CuPL) as ([C][*], report), mapped by name, never by order."""
    path = Path(path)
    data = basics.read_json(path, what)
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected {{class name: [sentences]}}, got {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(value, list):
            raise SystemExit(f"{path}: the value of {key!r} is {type(value).__name__}, not a list of sentences")
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            raise SystemExit(f"{path}: the list of {key!r} holds {bad[0]!r} ({type(bad[0]).__name__}), not a sentence")
    mapping, report = map_names_to_labels(list(data), classnames, aliases, path)
    per_class = [[] for _ in classnames]
    for key, labels in mapping.items():
        for label in labels:
            per_class[label] += [s.strip() for s in data[key] if s.strip()]
    shared = "; ".join(f"{k!r} fills classes {v}" for k, v in report["shared_keys"].items())
    print(f"{path.name}: {report['keys']} names -> {report['classes_matched']} of {len(classnames)} classes"
          + (f"; {report['classes_without_entry']} classes have no entry" if report["classes_without_entry"] else "")
          + (f"; shared names: {shared}" if shared else ""))
    return per_class, dict(report, file=str(path), digest=basics.file_digest(path))


# ---- descriptors as sentences that name their class ----

def descriptor_sentence(name, descriptor):
    """One rule for every descriptor of every source (VCD's, Menon & Vondrick 2023): '{c}, which is {d}' when the
    descriptor starts with the word a/an (or 'used'), '{c}, which {d}' when it starts with has/often/typically/may/can,
    else '{c}, which has {d}'. A sentence whose subject is the class itself ('It smells of pine.', 'Airfields have
    hangars.') keeps its verb: '{c}, which smells of pine'. Case is left alone apart from a capital first letter
    (CLIP's tokenizer lower-cases anyway); a final full stop is dropped, as VCD's phrases have none."""
    d = re.sub(r"\s+", " ", descriptor.strip()).rstrip(".").strip()
    words = d.split(" ")
    subject = rf"^(it|they|(the |an? )?{re.escape(name)}(e?s)?) (?=\w)"
    if len(words) > 1 and re.match(subject, d, flags=re.IGNORECASE):
        return f"{name}, which {re.sub(subject, '', d, count=1, flags=re.IGNORECASE)}"
    if words[0][:1].isupper() and not words[0][1:2].isupper():  # 'Long neck' -> 'long neck'; 'LED lights' stays
        d = d[0].lower() + d[1:]
    first = d.split(" ")[0].lower()
    if first in ("a", "an", "used"):
        return f"{name}, which is {d}"
    if first in ("has", "often", "typically", "may", "can"):
        return f"{name}, which {d}"
    return f"{name}, which has {d}"


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


def read_key(args):
    """The API key, from --llm-key-file or the environment: never from the command line, where `ps`, make's echo
    and the params files would show it."""
    if args.llm_key is not None:
        raise SystemExit("--llm-key is not accepted: a key on the command line shows in `ps`, in make's output and in "
                         "$(RUN)/params. Put it in OPENAI_API_KEY (or --llm-key-env NAME), or in a file given by "
                         "--llm-key-file PATH.")
    if args.llm_key_file:
        path = Path(args.llm_key_file)
        if not path.is_file():
            raise SystemExit(f"--llm-key-file {path}: not found{basics.missing_hint(path)}")
        return path.read_text(encoding="utf-8-sig").strip()
    return os.environ.get(args.llm_key_env, "")


def ask_llm(args, classnames):
    """Descriptors (and CuPL sentences) from a chat model, through the on-disk answer cache."""
    llm.fill(args.llm_question, args.num_descriptors, "x")  # an unknown placeholder stops here, before any request
    args.llm_base_url = llm.endpoint_base(args.llm_base_url)
    cache = llm.Cache(args.llm_cache or Path(args.out).with_name("llm_cache.jsonl"), args.llm_base_url,
                      args.llm_temperature)
    if cache.other_source:
        print(f"note: {cache.other_source} answers in {cache.path} came from another endpoint or temperature (or an "
              f"older kit that did not record them); they stay in the file and are not used for {args.llm_base_url} "
              f"at temperature {args.llm_temperature:g}")
    jobs = llm.plan_requests(classnames, args.llm_model, cache, args.num_descriptors, args.cupl_answers,
                             args.llm_question)
    missing = sum(not cached for _, cached in jobs)
    if args.dry_run:
        raise SystemExit(f"dry run: {len(jobs)} first requests for {len(classnames)} classes, {len(jobs) - missing} "
                         f"cached, {missing} to ask {args.llm_model} at {args.llm_base_url} (plus re-asks for answers "
                         f"with fewer than {args.num_descriptors} items)")
    key = read_key(args)
    if not key and urllib.parse.urlsplit(args.llm_base_url).hostname == "api.openai.com":
        raise SystemExit(f"no API key for {args.llm_base_url}: put it in {args.llm_key_env} or in a file given by "
                         "--llm-key-file PATH (a local server that needs none: OPENAI_BASE_URL or --llm-base-url)")
    client = llm.ChatClient(args.llm_base_url, args.llm_model, key, args.llm_temperature,
                           args.llm_timeout, backoff=args.llm_backoff)
    print(f"asking {args.llm_model} at {args.llm_base_url}: {missing} of {len(jobs)} requests not cached "
          f"({cache.path})")
    asked = llm.generate(classnames, client, cache, args.num_descriptors, args.cupl_answers, args.llm_concurrency,
                         args.llm_max_asks, args.llm_question)
    print(f"llm: {asked['requests']} requests, {asked['stats']['cached']} answers from the cache")
    if asked["stats"]["thinking"]:
        print(f"note: {asked['stats']['thinking']} answers held a reasoning model's <think> block: only the text "
              f"after it was read (the cache keeps the whole answer)")
    if asked["failures"]:
        listed = "\n  ".join(asked["failures"][:10]) + ("\n  ..." if len(asked["failures"]) > 10 else "")
        message = (f"{len(asked['failures'])} classes got no usable answer from {args.llm_model}:\n  {listed}\n"
                   f"The answers that came are cached in {cache.path}; run again to ask only for the rest")
        if not args.allow_llm_failures:
            raise SystemExit(message + " (or pass --allow-llm-failures to go on without them).")
        print("warning: " + message + "; --allow-llm-failures: going on without them.")
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
    p.add_argument("--aliases", default="",
                   help="JSON {name in a JSON file: class name or class index} for names that do not match (the "
                        "kit knows the ImageNet ones)")
    p.add_argument("--descriptor-text", choices=["vcd", "raw"], default="vcd",
                   help="vcd: every descriptor becomes a sentence naming its class, '{c}, which has {d}' (VCD's rule "
                        "for its phrases; the paper asks the LLM for sentences instead, and does not say whether they "
                        "name the class: a kit choice, docs/text.md); raw: the text as the file or the LLM gave it")
    p.add_argument("--num-descriptors", type=int, default=10, help="M descriptors kept per class (paper: 10)")
    p.add_argument("--per-class", type=int, default=100,
                   help="balance the corpus to this many sentences per class, 0 = keep all (paper: balanced, "
                        "count not given; kit: 100)")
    p.add_argument("--llm-model", default="", help="ask this chat model for the descriptors (paper: gpt-3.5-turbo); "
                                                   "naming one turns the LLM on")
    p.add_argument("--llm-base-url", default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
                   help="OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, else OpenAI)")
    p.add_argument("--llm-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--llm-key-file", default="", help="file holding the API key (instead of the environment)")
    p.add_argument("--llm-key", default=None, help=argparse.SUPPRESS)  # refused with a message, never used
    p.add_argument("--llm-temperature", type=float, default=0.7, help="sampling temperature (paper: not given)")
    p.add_argument("--llm-concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--llm-timeout", type=float, default=60.0, help="seconds before a request is retried")
    p.add_argument("--llm-backoff", type=float, default=1.0, help="first retry wait in seconds, doubled each retry")
    p.add_argument("--llm-max-asks", type=int, default=3,
                   help="answers asked per class when one has fewer than M items")
    p.add_argument("--llm-question", default=llm.DESCRIPTOR_QUESTION,
                   help="descriptor question; {m} = M, {c} or {CLS} = class name, {a} = a/an (paper: the default)")
    p.add_argument("--cupl-answers", type=int, default=0,
                   help="with --llm-model: answers per CuPL question (5 questions) added to the corpus; 0 = none")
    p.add_argument("--llm-cache", default="", help="answer cache (JSONL; default: llm_cache.jsonl next to --out)")
    p.add_argument("--allow-llm-failures", action="store_true",
                   help="write corpus.json even when some classes got no usable answer (they get no descriptor)")
    p.add_argument("--dry-run", action="store_true", help="print how many LLM requests this run would make, then stop")
    p.add_argument("--skip-data-check", action="store_true",
                   help="build the corpus without checking that DATA_ROOT holds the dataset's split files")
    p.add_argument("--seed", type=basics.seed_value, default=0, help="seed for balancing")
    args = p.parse_args(argv)

    # ---- setup: the data must be there before any LLM request or text encoding ----
    if not args.skip_data_check:
        basics.check_dataset(args.data_root, args.dataset)
    rng = random.Random(args.seed)
    classnames = basics.class_names(args.dataset, args.data_root)
    num_classes = len(classnames)
    aliases = dict(basics.dataset_info(args.dataset).get("name_aliases", {}))
    if args.aliases:
        aliases.update(basics.read_json(args.aliases, "alias map file (--aliases)"))
    basics.hold_run_lock(Path(args.out).parent, f"01_build_corpus.py -> {args.out}")

    # ---- corpus ----
    sources, files = {}, {}
    if args.templates:
        sources["templates"] = [template_sentences(n) for n in classnames]
    if args.wiki:
        sources["wiki"] = wiki_sentences(args.wiki, num_classes)
    if args.cupl:
        sources["cupl"], files["cupl"] = read_named_json(args.cupl, classnames, aliases, "CuPL file (--cupl, CUPL=)")
    asked = ask_llm(args, classnames) if args.llm_model else None
    if asked and args.cupl_answers:
        sources["cupl_llm"] = asked["cupl"]
    if not sources:
        raise SystemExit("no corpus source: keep --templates on, or give --wiki or --cupl")
    if basics.dataset_info(args.dataset).get("paper_wiki") and "wiki" not in sources:
        print(f"note: no Wikipedia text for {args.dataset} (no {args.data_root}/wiki folder, no --wiki): the paper's "
              "corpus has VL-LTR's Wikipedia release besides the templates, so this run is not the paper's recipe "
              "(docs/text.md)")
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
        raw, files["descriptors"] = read_named_json(args.descriptors, classnames, aliases,
                                                    "descriptor file (--descriptors, DESCRIPTORS=)")
    else:
        raise SystemExit("no descriptor source: give --descriptors FILE.json (VCD-style {class name: [descriptors]}, "
                         "e.g. from 'Visual Classification via Description' or CuPL; Make: DESCRIPTORS=FILE.json), "
                         "or ask an LLM with --llm-model NAME (Make: LLM_MODEL=NAME; key in OPENAI_API_KEY)")
    descriptors, kept_raw, short, over = [], [], [], []
    for c, name in enumerate(classnames):
        unique = list(dict.fromkeys(raw[c]))  # drop repeats, keep order
        kept = unique[:args.num_descriptors]
        if len(kept) < args.num_descriptors:
            short.append((name, len(kept)))
        if len(unique) > args.num_descriptors:
            over.append((name, len(unique)))
        descriptors.append([descriptor_sentence(name, d) if args.descriptor_text == "vcd" else d for d in kept])
        kept_raw.append(kept)
    without = [classnames[c] for c, d in enumerate(descriptors) if not d]
    if short:
        print(f"note: {len(short)} classes have fewer than {args.num_descriptors} descriptors: "
              + ", ".join(f"{n} ({k})" for n, k in short[:10]) + (" ..." if len(short) > 10 else ""))
    if over:  # e.g. VCD's ImageNet file has 11 for teddy bear
        print(f"note: {len(over)} classes have more than {args.num_descriptors} descriptors, and their first "
              f"{args.num_descriptors} are kept (M = {args.num_descriptors}, --num-descriptors): "
              + ", ".join(f"{n} ({k})" for n, k in over[:10]) + (" ..." if len(over) > 10 else ""))
    if without:  # e.g. VCD's Places365 file has an empty list for corn_field
        print(f"note: {len(without)} classes have no descriptor and are scored by their class-name prompt "
              f"(stage 02): {', '.join(without[:10])}")

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
    meta = basics.make_meta("01_build_corpus", args, dataset=args.dataset, num_classes=num_classes,
                            classnames_digest=basics.names_digest(classnames), sources=summary,
                            per_class_sentences=per_class, balanced_to=args.per_class or None, files=files,
                            classes_short_of_descriptors=[n for n, _ in short], classes_without_descriptors=without,
                            classes_cut_to_m_descriptors=[n for n, _ in over],
                            descriptor_text=args.descriptor_text, llm=llm_meta)
    basics.atomic_write_json(args.out, dict(classnames=classnames, sentences=merged, descriptors=descriptors,
                                            descriptors_raw=kept_raw, meta=meta))
    total = sum(len(s) for s in merged)
    print(f"corpus: {num_classes} classes, {total} sentences from {', '.join(sources)}, "
          f"{sum(len(d) for d in descriptors)} descriptors -> {args.out}")


if __name__ == "__main__":
    basics.run_script(main)
