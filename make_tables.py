"""The paper's tables from the kit's results files, next to the published numbers.

Reads   $(RUN)/results.json (the full HLC run), $(RUN)/ablation/<row>/results.json (Table 4, Table 6's N/A row,
        and the linear probe and VPT rows of Tables 1-3), $(RUN)/systems/<name>/results.json (the compared systems,
        Tables 1-3).
Writes  $(RUN)/tables/table<N>.md and compare.md (HLC and every system with its optimizer steps, learning rate,
        trainable parameters and weight selection), and prints them; with --seeds, one file of several runs' tables as
        mean and range, ending with the relations the toy world is built to show and whether each holds (make
        toy-seeds).

    python make_tables.py --run runs/places_lt --table 1 4 6 7 compare
    python make_tables.py --seeds runs/toy runs/toy-seed1 runs/toy-seed2 --out runs/toy-seeds.md

Tables 1, 2 and 3 are the paper's comparisons on Places-LT, ImageNet-LT and iNaturalist 2018: each writes the run at
hand, with the published numbers of the same row where the run is that table's dataset (empty otherwise). Every
published cell says where it comes from, and a row whose published number used another backbone says so. Cells
our text copy of the paper does not let us read are left empty, never guessed. Runs in a second; the trainings
behind the rows are Make targets (`make table4`, `make table1`).
"""
import argparse
import json
from pathlib import Path

import numpy as np

import basics

# Table 6's N/A row: every class ranked by the descriptors of a model trained with prompts and reweighted descriptors
# alone (ablation na). The paper's N/A figures are its Table 5 "Ours" row, which keeps only those two parts.
NA_ROW = "N/A: prompts and reweighted descriptors alone"

# ---- published numbers: (many, medium, few, all), where they come from, and what differs from the kit's run ----
PLACES, IMAGENET, INAT = "places_lt", "imagenet_lt", "inat2018"
IN21K = "ViT-B/16 pre-trained on ImageNet-21k, not CLIP"
LIFT_NOTE = "not in the HLC paper; overall only; whether with TTE not checked"
# LIFT on CIFAR-100-LT (CLIP ViT-B/16), by imbalance ratio: 100 minus the error rates Papers with Code lists for it
LIFT_CIFAR = {100: 81.7, 50: 83.1, 10: 84.9}
PAPER = {
    4: {PLACES: {
        "a) zero-shot CLIP": ((35.0, 37.3, 44.2, 37.9), "HLC Table 4 a", ""),
        "b) linear probe": ((55.7, 34.5, 14.4, 38.4), "HLC Table 4 b", ""),
        "d) + VPT": ((55.1, 37.5, 22.7, 41.2), "HLC Table 4 d", ""),
        "e) + LA": ((50.2, 47.2, 40.7, 47.1), "HLC Table 4 e", ""),
        "f) + corpus": ((51.2, 48.9, 43.9, 48.8), "HLC Table 4 f", ""),
        "g) + SFM": ((53.1, 50.2, 46.4, 50.5), "HLC Table 4 g", ""),
        "h) + descriptors, unweighted": ((49.9, 48.2, 40.3, 47.3), "HLC Table 4 h", ""),
        "i) + reweighted (HLC)": ((53.1, 52.1, 48.6, 51.5), "HLC Table 4 i", "the paper does not state its descriptor "
                                                                             "loss")}},
    # Table 6, read from our text copy: rows N/A, 9 and 11 are whole; rows 1 and 3, and 5 and 7, run into each other
    6: {PLACES: {NA_ROW: ((52.7, 41.1, 36.8, 44.5), "HLC Table 6 N/A (= its Table 5 'Ours')", ""),
                 "9": ((52.5, 49.1, 45.1, 49.5), "HLC Table 6", ""),
                 "11": ((52.3, 47.8, 43.2, 48.5), "HLC Table 6", "")}},
    7: {PLACES: {"CLIP (class-name prompts)": ((None, None, None, 37.91), "HLC Table 7", ""),
                 "descriptors, plain average (VCD)": ((None, None, None, 40.51), "HLC Table 7 (VCD, GPT-3.5)", ""),
                 "descriptors, reweighted (HLC)": ((None, None, None, 43.12), "HLC Table 7", "")}},
    # Tables 1-3, by the kit's variant names
    1: {PLACES: {
        "zero_shot": ((35.0, 37.3, 44.2, 37.9), "HLC Table 1", ""),
        "linear_probe": ((55.7, 34.5, 14.4, 38.4), "HLC Table 4 b", ""),
        "vpt": ((50.4, 33.8, 23.3, 37.5), "HLC Table 1", IN21K),
        "ballad": ((49.3, 50.2, 48.4, 49.5), "HLC Table 1", ""),
        "ivlm_ce": ((None, None, None, 37.4), "IVLM Table 4, one stage", ""),
        "ivlm_ce_disalign": ((None, None, None, 46.78), "IVLM Table 4, two stages", ""),
        "vl_ltr_lgr": ((54.2, 48.5, 42.0, 50.1), "HLC Table 1", "both towers fine-tuned"),
        "lt_dpt": ((46.9, 52.6, 49.2, 49.9), "LT-DPT Table 3", IN21K),
        "lift_tte": ((None, None, None, 52.2), "LIFT, as Papers with Code lists it", LIFT_NOTE),
        "hlc": ((53.1, 52.1, 48.6, 51.5), "HLC Table 1", "")}},
    2: {IMAGENET: {
        "zero_shot": ((65.4, 63.5, 63.2, 64.2), "HLC Table 2", ""),
        "ballad": ((None, None, None, 75.7), "BALLAD Table 1", "both towers fine-tuned"),
        "ivlm_ce": ((None, None, None, 68.14), "IVLM Table 4, one stage", ""),
        "ivlm_ce_disalign": ((None, None, None, 73.23), "IVLM Table 4, two stages", ""),
        "ivlm_ce_marc": ((83.9, 78.3, 70.0, 79.3), "HLC Table 2, MARC+IVLM", "ViT-L/14 (IVLM Table 1)"),
        "vl_ltr_lgr": ((84.5, 74.6, 59.3, 77.2), "HLC Table 2", "both towers fine-tuned"),
        "lt_dpt": ((85.8, 84.1, 78.4, 84.0), "LT-DPT Table 2", IN21K),
        "lift_tte": ((None, None, None, 78.3), "LIFT, as Papers with Code lists it", LIFT_NOTE),
        "hlc": ((84.1, 79.1, 71.1, 79.9), "HLC Table 2", "")}},
    3: {INAT: {
        "zero_shot": ((9.9, 5.3, 4.6, 5.5), "HLC Table 3", ""),
        "ballad": ((None, None, None, 74.2), "BALLAD Table 3", "ResNet-50"),
        "ivlm_ce": ((None, None, None, 51.35), "IVLM Table 4, one stage", ""),
        "ivlm_ce_disalign": ((None, None, None, 59.22), "IVLM Table 4, two stages", ""),
        "vl_ltr_lgr": ((81.6, 78.0, 74.4, 76.8), "HLC Table 3", "both towers fine-tuned"),
        "lt_dpt": ((62.7, 77.7, 79.5, 76.9), "LT-DPT Table 3", IN21K),
        "hlc": ((78.3, 81.8, 77.5, 79.8), "HLC Table 3",
                "visual tower fully fine-tuned (the kit's inat2018 recipe too)")}},
}
TABLE_DATASET = {1: PLACES, 2: IMAGENET, 3: INAT, 4: PLACES, 6: PLACES, 7: PLACES}
TITLES = {1: "Table 1: comparison on Places-LT", 2: "Table 2: comparison on ImageNet-LT",
          3: "Table 3: comparison on iNaturalist 2018", 4: "Table 4: ablation", 6: "Table 6: candidates K",
          7: "Table 7: zero-shot open-vocabulary classification"}

# Table 4: row -> (ablation run, variant). The switches of each run are in the Makefile (ABLATION_*) and in its meta.
TABLE4_ROWS = (("a) zero-shot CLIP", "full", "zero_shot"), ("b) linear probe", "lp", "coarse"),
               ("d) + VPT", "vpt", "coarse"), ("e) + LA", "vpt", "coarse_la"),
               ("f) + corpus", "corpus", "coarse_la"), ("g) + SFM", "sfm", "coarse_la"),
               ("h) + descriptors, unweighted", "sfm", "hlc_unweighted"),
               ("i) + reweighted (HLC)", "full", "hlc"),
               ("i') the same, plain cross-entropy descriptor loss", "desc_ce", "hlc"))
# Tables 1-3: the kit's rows, in the papers' order; systems add their own variants (see SYSTEM_ROWS)
BASELINE_ROWS = (("Zero-shot CLIP", "full", "zero_shot", "zero_shot"), ("CLIP + linear probe", "lp", "coarse",
                 "linear_probe"), ("VPT (CLIP, cross-entropy)", "vpt", "coarse", "vpt"))
SYSTEM_ROWS = {  # system -> its name in the tables; every variant a system writes becomes a row
    "ballad": "BALLAD", "imbalance_vlm": "Imbalance-VLM", "vl_ltr": "VL-LTR", "lt_dpt": "LT-DPT", "lift": "LIFT"}


def fmt(x):
    return "-" if x is None else f"{x:.2f}"


def render(title, rows, paper):
    """rows: [(label, {many, medium, few, overall}, key into paper)]; paper: {key: (numbers, source, note)}."""
    head = "| | Many | Med. | Few | Acc. |" + (" paper Many | Med. | Few | Acc. | from |" if paper else "")
    lines = [f"# {title}", "", head, "|" + " --- |" * (5 + 5 * bool(paper))]
    for label, r, key in rows:
        line = f"| {label} | {fmt(r['many'])} | {fmt(r['medium'])} | {fmt(r['few'])} | {fmt(r['overall'])} |"
        if paper:
            numbers, source, note = paper.get(key, ((None,) * 4, "", ""))
            line += "".join(f" {fmt(x)} |" for x in numbers) + f" {source}{f' ({note})' if note else ''} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def load(path, how="make"):
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{path}: not found; `{how}` builds it")
    return json.loads(path.read_text())


# what every row of one table shares: the evaluation split (by name and by digest), the shot rule, and what the models
# were trained from (common.training_facts), as each results.json's meta records them
SAME_DATA = ("split", "eval_split_digest", "shot_rule", "train_split_digest", "text_features_digest",
             "classnames_digest")


def stale_rows(reference, others):
    """[(path, what differs)] for each (path, results) of `others` not made on the data of `reference` (path, results):
    a row of another split, shot rule, training split or text features (an older run's file) is never put beside it."""
    ref_path, ref = reference
    want = {k: ref.get("meta", {}).get(k) for k in SAME_DATA}
    stale = []
    for path, res in others:
        meta = res.get("meta", {})
        differs = [f"{k} {meta.get(k)!r}, {ref_path.name} {want[k]!r}" for k in SAME_DATA if meta.get(k) != want[k]]
        if differs:
            stale.append((path, "; ".join(differs)))
    return stale


def check_same_data(reference, others, how):
    """Stop, naming each stale file and what differs, when the rows of one table were not made on the same data."""
    stale = stale_rows(reference, others)
    if stale:
        raise SystemExit(f"not one run: these results differ from {reference[0]} in what they were made on, so they "
                         "are not put in its table:\n  " + "\n  ".join(f"{p}: {why}" for p, why in stale)
                         + f"\nThey are stale; `{how}` makes them again with this run's settings.")


def comparison_rows(run, full, how="make compare"):
    """(label, numbers, variant, training) for the baselines, every compared system found under run/systems/, and HLC;
    training: optimizer steps, lr, trainable parameters and selection rule, as each run recorded them. Every file must
    have been made on the data of run/results.json (check_same_data)."""
    rows, files = [], []
    for label, ablation, variant, key in BASELINE_ROWS:
        path = run / "ablation" / ablation / "results.json"
        res = full if ablation == "full" else load(path, how)
        if ablation != "full":
            files.append((path, res))
        rows.append((label, res["variants"][variant], key, res.get("training") if ablation != "full" else None))
    for name, title in SYSTEM_ROWS.items():
        path = run / "systems" / name / "results.json"
        if path.exists():
            res = json.loads(path.read_text())
            files.append((path, res))
            for variant, numbers in res["variants"].items():
                rows.append((f"{title}: {res.get('labels', {}).get(variant, variant)}", numbers, variant,
                             res.get("training")))
    check_same_data((run / "results.json", full), files, how)
    rows.append(("HLC", full["variants"]["hlc"], "hlc", full.get("training")))
    return rows


def table4_rows(run, full, how="make table4"):
    """[(label, numbers)] of Table 4, each ablation row from its own run, all on the data of run/results.json."""
    rows, files = [], []
    for label, ablation, variant in TABLE4_ROWS:
        path = run / "ablation" / ablation / "results.json"
        res = full if ablation == "full" else load(path, how)
        if ablation != "full":
            files.append((path, res))
        rows.append((label, res["variants"][variant]))
    check_same_data((run / "results.json", full), files, how)
    return rows


def render_compare(title, rows, paper):
    """The comparison with each method's budget: steps, learning rate, trainable parameters, weights kept."""
    text = render(title, [(label, r, key) for label, r, key, _ in rows], paper)
    lines = ["", "| | optimizer steps | learning rate | trainable parameters | weights tested |",
             "| --- | --- | --- | --- | --- |"]
    seen = set()
    for label, _, _, t in rows:
        name = label.split(":")[0]
        if t and name not in seen:
            seen.add(name)
            lines.append(f"| {name} | {t.get('optimizer_steps', '-')} | {t.get('lr', '-')} | "
                         f"{t.get('trainable_params', '-')} | {t.get('selection', '-')} |")
    return text + "\n".join(lines) + "\n"


def table_rows(path):
    """{row label: [many, medium, few, overall]} from the first markdown table of a file this script wrote (the
    comparison's budget table, which follows it, is not read)."""
    rows = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if rows and not line.strip():
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0] and cells[1] not in ("Many", "---"):
            try:
                rows[cells[0]] = [None if c == "-" else float(c) for c in cells[1:5]]
            except ValueError:
                continue
    return rows


def seeds_table(runs, out):
    """Tables 4, 6, 7 and the comparison of several runs (seeds) as mean and range (min-max) per cell, and each run's
    overall accuracy in the order given."""
    parts = [f"# The toy world over {len(runs)} seeds: mean (min to max) of {', '.join(str(r) for r in runs)}", ""]
    for name in ("table4", "table6", "table7", "compare"):
        files = [Path(r) / "tables" / f"{name}.md" for r in runs]
        tables = [table_rows(f) for f in files if f.exists()]
        if len(tables) < len(runs):
            parts += [f"({name}: missing in some runs; `make toy-seeds` makes them)", ""]
            continue
        parts += [f"## {name}", "", "| | Many | Med. | Few | Acc. | Acc. per seed |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for label in tables[0]:
            cells = []
            for i in range(4):
                values = [t[label][i] for t in tables if label in t and t[label][i] is not None]
                cells.append(f"{np.mean(values):.2f} ({min(values):.2f} to {max(values):.2f})" if values else "-")
            cells.append(", ".join("-" if label not in t or t[label][3] is None else f"{t[label][3]:.2f}"
                                   for t in tables))
            parts.append(f"| {label} | " + " | ".join(cells) + " |")
        parts.append("")
        if name == "compare":  # each method's budget: the same recipe in every run, so the first run's
            text = (Path(runs[0]) / "tables" / "compare.md").read_text(encoding="utf-8")
            budget = text.split("| optimizer steps |", 1)
            if len(budget) == 2:
                parts += [f"Budget (the same in every run; {runs[0]}):", "",
                          "| | optimizer steps |" + budget[1].rstrip(), ""]
    if all((Path(r) / "ablation" / "na" / "results.json").exists() for r in runs):
        order = ", ".join(str(r) for r in runs)
        parts += ["## relations", "", f"Each relation the toy world is built to show, in points of overall accuracy "
                  f"(seeds in the order {order}; the paper's figures are Places-LT's):", "", relations_table(runs)]
    else:
        parts += ["(relations: the ablation runs are missing in some runs; `make toy-seeds` makes them)", ""]
    basics.atomic_write_text(out, "\n".join(parts) + "\n")
    print("\n".join(parts))


# The relations the toy world is built to show (issue 32): each with the paper's figure where it has one (Places-LT,
# Tables 4, 6 and 7), how one run's value is read from relation_values, and the tests it must pass over the seeds as
# (where, comparison, floor), where "mean" tests the mean of the seeds and "every" each seed.
RELATIONS = (
    ("b -> d: + VPT", "+2.8", lambda v: v["vpt"] - v["lp"], (("mean", ">", 0),)),
    ("d -> e: + LA", "+5.9", lambda v: v["vpt_la"] - v["vpt"], (("mean", ">", 0), ("every", ">", 0))),
    ("e -> f: + corpus", "+1.7", lambda v: v["corpus"] - v["vpt_la"], (("mean", ">", 0),)),
    ("f -> g: + SFM", "+1.7", lambda v: v["sfm"] - v["corpus"], (("mean", ">", 0),)),
    ("g -> h: plain descriptor average", "-3.2", lambda v: v["plain"] - v["sfm"],
     (("mean", "<", 0), ("every", "<", 0))),
    ("h -> i: learned weights", "+4.2", lambda v: v["hlc"] - v["plain"], (("mean", ">", 0), ("every", ">", 0))),
    ("HLC over the best other row of Table 4", "+1.0 (row g)", lambda v: v["hlc"] - v["best_other"],
     (("every", ">", 0),)),
    ("HLC over the linear probe with LA", "", lambda v: v["hlc"] - v["lp_la"], (("mean", ">=", 2),)),
    ("K = 5 over K = 1", "+1.0 (row g as K = 1)", lambda v: v["k5"] - v["k1"], (("every", ">=", 0),)),
    ("HLC over the paper's N/A model (Table 6)", "+7.0", lambda v: v["hlc"] - v["na"], (("mean", ">=", 2),)),
    ("HLC over the full model's descriptors alone (\"all\")", "", lambda v: v["hlc"] - v["all"], (("mean", ">=", 2),)),
    ("Table 7: VCD average over CLIP", "+2.6", lambda v: v["vcd"] - v["zero_shot"], (("every", ">", 0),)),
    ("Table 7: reweighted over VCD average", "+2.6", lambda v: v["reweighted"] - v["vcd"], (("every", ">", 0),)),
    # "well below uniform": at least a fifth under it (2 points x 100 with ten descriptors a class); issue 32 gives
    # 8.7 against 10, an eighth under, as a weight that does not silence
    ("uniform minus the non-visual descriptors' weight (x 100)", "", lambda v: v.get("below_nonvisual"),
     (("every", ">=", 2),)),
    ("uniform minus the wrong descriptors' weight (x 100)", "", lambda v: v.get("below_wrong"), (("every", ">=", 2),)),
)
OPS = {">": lambda x, f: x > f, ">=": lambda x, f: x >= f, "<": lambda x, f: x < f}


def relation_values(run):
    """One run's figures behind RELATIONS (overall accuracy in points), read from its results files and checked to be
    made on the same data as its results.json."""
    run = Path(run)
    full = load(run / "results.json", "make all")
    ab = {}
    for name in ("lp", "vpt", "corpus", "sfm", "na"):
        path = run / "ablation" / name / "results.json"
        ab[name] = (path, load(path, "make tables"))
    check_same_data((run / "results.json", full), list(ab.values()), "make tables")
    acc = lambda res, variant: res["variants"][variant]["overall"]
    ab = {name: res for name, (_, res) in ab.items()}
    table4 = table4_rows(run, full, "make tables")
    v = dict(lp=acc(ab["lp"], "coarse"), lp_la=acc(ab["lp"], "coarse_la"), vpt=acc(ab["vpt"], "coarse"),
             vpt_la=acc(ab["vpt"], "coarse_la"), corpus=acc(ab["corpus"], "coarse_la"), sfm=acc(ab["sfm"], "coarse_la"),
             plain=acc(ab["sfm"], "hlc_unweighted"), hlc=acc(full, "hlc"),
             best_other=max(r["overall"] for label, r in table4 if not label.startswith("i) ")),
             k1=full["topk_sweep"]["1"]["overall"], k5=full["topk_sweep"]["5"]["overall"],
             all=full["topk_sweep"]["all"]["overall"], na=ab["na"]["topk_sweep"]["all"]["overall"],
             zero_shot=acc(full, "zero_shot"), vcd=acc(full, "descriptors_zero_shot"),
             reweighted=full["zero_shot_reweighted"]["overall"])
    kinds = full.get("descriptor_weights") or {}
    if (run / "predictions.npz").exists() and kinds:  # uniform: 1 / (a class's descriptors), over the classes
        weights = np.load(run / "predictions.npz")["desc_weights"]
        uniform = float(np.mean(1.0 / np.maximum(1, (weights > 0).sum(1))))
        for kind in ("nonvisual", "wrong"):
            if kinds.get(kind) is not None:
                v[f"below_{kind}"] = 100 * (uniform - kinds[kind])
    return v


def relations_table(runs):
    """The markdown table of RELATIONS over the runs (seeds): each seed's value, the mean, what is asked, and whether
    it holds; a relation a run cannot give (no descriptor kinds) is left out."""
    values = [relation_values(r) for r in runs]
    lines = ["| relation | paper | per seed | mean | asked | holds |", "| --- | --- | --- | --- | --- | --- |"]
    for label, paper, read, tests in RELATIONS:
        xs = [read(v) for v in values]
        if any(x is None for x in xs):
            continue
        mean = float(np.mean(xs))
        failed = []
        for where, op, floor in tests:
            if where == "mean" and not OPS[op](round(mean, 2), floor):
                failed.append("mean")
            if where == "every":
                failed += [f"seed {i}" for i, x in enumerate(xs) if not OPS[op](round(x, 2), floor)]
        asked = ", ".join(f"{op} {floor:g} {'on the mean' if where == 'mean' else 'every seed'}"
                          for where, op, floor in tests)
        lines.append(f"| {label} | {paper} | {', '.join(f'{x:+.2f}' for x in xs)} | {mean:+.2f} | {asked} | "
                     f"{'yes' if not failed else 'no: ' + ', '.join(dict.fromkeys(failed))} |")
    return "\n".join(lines) + "\n"


def cifar_paper(run):
    """LIFT's published CIFAR-100-LT number for this run's imbalance ratio (read from its training counts)."""
    z = np.load(run / "predictions.npz")
    ratio = int(round(z["class_counts"].max() / max(1, z["class_counts"].min())))
    if ratio not in LIFT_CIFAR:
        return {}
    return {"lift_tte": ((None, None, None, LIFT_CIFAR[ratio]), f"LIFT, as Papers with Code lists it (IR {ratio})",
                         LIFT_NOTE)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="run directory holding results.json (and ablation/, systems/)")
    p.add_argument("--table", nargs="+", choices=["1", "2", "3", "4", "6", "7", "compare"], default=["4", "6", "7"],
                   help="tables to write")
    p.add_argument("--seeds", nargs="+", help="instead: several runs' tables as mean and range (make toy-seeds)")
    p.add_argument("--out", help="with --seeds: the markdown file to write")
    args = p.parse_args(argv)
    if args.seeds:
        return seeds_table(args.seeds, args.out or "toy-seeds.md")
    if not args.run:
        raise SystemExit("give --run RUN (or --seeds RUN RUN ...)")

    run = Path(args.run)
    full = load(run / "results.json")
    dataset = full["dataset"]
    for t in args.table:
        if t == "compare":
            paper = cifar_paper(run) if dataset == "cifar100_lt" else PAPER[{PLACES: 1, IMAGENET: 2, INAT: 3}[dataset]][
                dataset] if dataset in (PLACES, IMAGENET, INAT) else {}
            text = render_compare(f"HLC and the compared systems on {dataset}", comparison_rows(run, full), paper)
            basics.atomic_write_text(run / "tables" / "compare.md", text)
            print(text)
            continue
        t = int(t)
        paper = PAPER[t].get(dataset, {})
        note = "" if dataset == TABLE_DATASET[t] else (f" (the paper's numbers are for {TABLE_DATASET[t]}, so no "
                                                       "paper columns here)")
        title = f"{TITLES[t]}: the kit on {dataset}{note}"
        if t == 4:
            text = render(title, [(label, r, label) for label, r in table4_rows(run, full)], paper)
        elif t == 6:
            rows = [(k if k != "all" else "all (no classifier)", r, k if k != "all" else "all (no classifier)")
                    for k, r in full["topk_sweep"].items()]
            na_path = run / "ablation" / "na" / "results.json"
            na = load(na_path, "make table6")
            check_same_data((run / "results.json", full), [(na_path, na)], "make table6")
            rows.append((NA_ROW, na["topk_sweep"]["all"], NA_ROW))
            text = render(title + " (one evaluation)", rows, paper)
            taus = [(f"tau = {tt}, {v}", r[v], None) for tt, r in full["tau_sweep"].items()
                    for v in ("coarse_la", "hlc")]
            text += "\n" + render(f"Logit adjustment strength tau (Eq. 4; the paper uses 1), K = {full['k']}: the kit "
                                  f"on {dataset}", taus, {})
        elif t == 7:
            rows = [("CLIP (class-name prompts)", full["variants"]["zero_shot"]),
                    ("descriptors, plain average (VCD)", full["variants"]["descriptors_zero_shot"]),
                    ("descriptors, reweighted (HLC)", full["zero_shot_reweighted"])]
            text = render(title, [(label, r, label) for label, r in rows], paper)
        else:
            text = render(title, [(label, r, key) for label, r, key, _ in comparison_rows(run, full, f"make table{t}")],
                          paper)
        basics.atomic_write_text(run / "tables" / f"table{t}.md", text)
        print(text)


if __name__ == "__main__":
    basics.run_script(main)
