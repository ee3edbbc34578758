"""report.html: one self-contained page a teacher can project, drawn from the files a run holds.

Reads   RUN/results.json and RUN/predictions.npz (stage 04), RUN/log.jsonl (stage 03), RUN/tables/*.md and
        RUN/ablation/*/results.json (make tables), RUN/systems/*/results.json (make compare), whichever exist.
Writes  RUN/report.html: inline SVG charts, no script library, no other file (opens offline).

    python report.py --run runs/toy          # stage 04 writes it; make tables and make compare update it

Charts: per-class accuracy against training images (log scale) for the classifier, with logit adjustment, and HLC;
the six variants by shot group; the K and tau sweeps; the training curves; the learned descriptor weights; Table 4 as a
waterfall and the compared systems, when their runs exist. Standard library and numpy only; well under a second.
"""
import argparse
import html
import json
import math
from pathlib import Path

import numpy as np

import basics
import make_tables

GROUP_COLOURS = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#2ca02c"}
SERIES = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b")
W, H, PAD = 460, 250, 44  # one chart's size and margin, in px


def esc(text):
    return html.escape(str(text), quote=True)


def nice(v):
    return f"{v:.0f}" if abs(v) >= 10 or v == int(v) else f"{v:.2g}"


class Chart:
    """An SVG plot: axes with ticks, then points, lines, bars and labels in data coordinates."""

    def __init__(self, title, x_range, y_range, x_label="", y_label="", log_x=False, width=W, height=H):
        self.title, self.items, self.log_x = title, [], log_x
        self.w, self.h = width, height
        self.x0, self.x1 = (math.log10(x_range[0]), math.log10(x_range[1])) if log_x else x_range
        self.y0, self.y1 = y_range
        if self.x1 == self.x0:
            self.x1 += 1
        if self.y1 == self.y0:
            self.y1 += 1
        self.x_label, self.y_label = x_label, y_label

    def px(self, x):
        x = math.log10(x) if self.log_x else x
        return PAD + (x - self.x0) / (self.x1 - self.x0) * (self.w - 1.5 * PAD)

    def py(self, y):
        return self.h - PAD + (y - self.y0) / (self.y1 - self.y0) * (2 * PAD - self.h)

    def point(self, x, y, colour, tip="", r=3.5):
        self.items.append(f"<circle cx='{self.px(x):.1f}' cy='{self.py(y):.1f}' r='{r}' fill='{colour}' "
                          f"fill-opacity='0.75'><title>{esc(tip)}</title></circle>")

    def line(self, xs, ys, colour, label=None, dash=""):
        pts = " ".join(f"{self.px(x):.1f},{self.py(y):.1f}" for x, y in zip(xs, ys) if y is not None)
        self.items.append(f"<polyline points='{pts}' fill='none' stroke='{colour}' stroke-width='2' "
                          f"stroke-dasharray='{dash}'/>")
        for x, y in zip(xs, ys):
            if y is not None:
                self.point(x, y, colour, f"{label or ''} {x}: {y:.2f}", r=2.5)

    def bar(self, x_left, width, y_bottom, y_top, colour, tip=""):
        top, bottom = self.py(max(y_bottom, y_top)), self.py(min(y_bottom, y_top))
        width_px = self.px(x_left + width) - self.px(x_left)
        self.items.append(f"<rect x='{self.px(x_left):.1f}' y='{top:.1f}' width='{width_px:.1f}' "
                          f"height='{max(bottom - top, 0.5):.1f}' fill='{colour}'><title>{esc(tip)}</title></rect>")

    def text(self, x, y, label, anchor="middle", size=10, rotate=0, colour="#333"):
        tx, ty = self.px(x), self.py(y)
        turn = f" transform='rotate({rotate} {tx:.1f} {ty:.1f})'" if rotate else ""
        self.items.append(f"<text x='{tx:.1f}' y='{ty:.1f}' font-size='{size}' text-anchor='{anchor}' "
                          f"fill='{colour}'{turn}>{esc(label)}</text>")

    def legend(self, entries):
        for i, (label, colour) in enumerate(entries):
            x, y = PAD + 8 + 110 * (i % 3), 22 + 13 * (i // 3)
            self.items.append(f"<rect x='{x}' y='{y - 8}' width='9' height='9' fill='{colour}'/><text x='{x + 13}' "
                              f"y='{y}' font-size='10'>{esc(label)}</text>")

    def svg(self, x_ticks=None, y_ticks=None):
        axes = [f"<line x1='{PAD}' y1='{self.h - PAD}' x2='{self.w - PAD / 2}' y2='{self.h - PAD}' stroke='#555'/>",
                f"<line x1='{PAD}' y1='{PAD / 2}' x2='{PAD}' y2='{self.h - PAD}' stroke='#555'/>"]
        for y in y_ticks if y_ticks is not None else np.linspace(self.y0, self.y1, 5):
            axes.append(f"<line x1='{PAD - 3}' y1='{self.py(y):.1f}' x2='{self.w - PAD / 2}' y2='{self.py(y):.1f}' "
                        f"stroke='#eee'/><text x='{PAD - 5}' y='{self.py(y) + 3:.1f}' font-size='9' "
                        f"text-anchor='end'>{nice(y)}</text>")
        for x, label in x_ticks or []:
            axes.append(f"<text x='{self.px(x):.1f}' y='{self.h - PAD + 13}' font-size='9' "
                        f"text-anchor='middle'>{esc(label)}</text>")
        axes.append(f"<text x='{self.w / 2:.0f}' y='{self.h - 8}' font-size='10' text-anchor='middle'>"
                    f"{esc(self.x_label)}</text><text x='12' y='{self.h / 2:.0f}' font-size='10' text-anchor='middle' "
                    f"transform='rotate(-90 12 {self.h / 2:.0f})'>{esc(self.y_label)}</text>")
        return (f"<figure><svg class='chart' width='{self.w}' height='{self.h}' viewBox='0 0 {self.w} {self.h}' "
                f"role='img'><title>{esc(self.title)}</title>{''.join(axes)}{''.join(self.items)}</svg>"
                f"<figcaption>{esc(self.title)}</figcaption></figure>")


def per_class_chart(z, variant, title):
    """Accuracy of each class against its training images (log scale), coloured by shot group."""
    labels, pred, counts = z["labels"], z[f"pred_{variant}"], z["class_counts"]
    grouping = z["group_counts"] if "group_counts" in z.files else counts
    groups = basics.shot_groups(grouping, str(z["shot_rule"]) if "shot_rule" in z.files else "lift")
    seen = np.bincount(labels, minlength=len(counts))
    acc = 100 * np.bincount(labels, weights=pred == labels, minlength=len(counts)) / np.maximum(seen, 1)
    chart = Chart(title, (max(1, counts.min()), max(2, counts.max())), (0, 100), "training images (log scale)",
                  "class accuracy %", log_x=True)
    for c in np.flatnonzero(seen):
        name = basics.GROUPS[groups[c]]
        chart.point(max(1, counts[c]), acc[c], GROUP_COLOURS[name], f"class {c}: {counts[c]} images, {acc[c]:.0f} %")
    chart.legend([(g, GROUP_COLOURS[g]) for g in basics.GROUPS])
    decades = [10 ** k for k in range(0, 7) if max(1, counts.min()) <= 10 ** k <= max(2, counts.max())]
    return chart.svg(x_ticks=[(d, str(d)) for d in decades], y_ticks=[0, 25, 50, 75, 100])


def grouped_bars(rows, title, y_label="accuracy %"):
    """rows: [(name, {many, medium, few, overall})] as groups of four bars."""
    keys = ("many", "medium", "few", "overall")
    colours = dict(GROUP_COLOURS, overall="#555")
    chart = Chart(title, (0, len(rows)), (0, 100), "", y_label, width=max(W, 70 * len(rows) + 60))
    for i, (name, r) in enumerate(rows):
        for j, key in enumerate(keys):
            if r.get(key) is not None:
                chart.bar(i + 0.1 + 0.2 * j, 0.18, 0, r[key], colours[key], f"{name} {key}: {r[key]:.2f}")
        chart.text(i + 0.5, -7, name, size=9)
    chart.legend([(k, colours[k]) for k in keys])
    return chart.svg(y_ticks=[0, 25, 50, 75, 100])


def sweep_chart(series, title, x_label, x_ticks):
    """series: [(label, [(x, y)])] as lines."""
    ys = [y for _, pts in series for _, y in pts if y is not None]
    xs = [x for _, pts in series for x, _ in pts]
    chart = Chart(title, (min(xs), max(xs)), (max(0, min(ys) - 5), min(100, max(ys) + 5)), x_label, "accuracy %")
    for (label, pts), colour in zip(series, SERIES):
        chart.line([x for x, _ in pts], [y for _, y in pts], colour, label)
    chart.legend([(label, colour) for (label, _), colour in zip(series, SERIES)])
    return chart.svg(x_ticks=x_ticks)


def curve_chart(records, key, title, y_label):
    xs = [r["epoch"] for r in records if key in r]
    ys = [r[key] for r in records if key in r]
    if not xs:
        return ""
    low, high = min(ys), max(ys)
    margin = (high - low) * 0.1 or abs(high) * 0.1 or 1
    chart = Chart(title, (min(xs), max(xs) + (max(xs) == min(xs))), (low - margin, high + margin), "epoch", y_label,
                  width=300, height=200)
    chart.line(xs, ys, SERIES[0], key)
    step = max(1, len(xs) // 6)
    return chart.svg(x_ticks=[(x, str(x)) for x in xs[::step]],
                     y_ticks=np.linspace(low - margin, high + margin, 4).tolist())


def histogram_chart(values, title):
    edges = np.linspace(0, max(0.5, float(values.max())), 21)
    hist, _ = np.histogram(values, edges)
    chart = Chart(title, (edges[0], edges[-1]), (0, hist.max() * 1.1 or 1), "softmax weight of a descriptor",
                  "descriptors")
    for lo, hi, n in zip(edges[:-1], edges[1:], hist):
        chart.bar(lo, hi - lo, 0, n, SERIES[0], f"{lo:.2f}-{hi:.2f}: {n}")
    return chart.svg(x_ticks=[(e, f"{e:.2f}") for e in edges[::5]])


def horizontal_bars(rows, title, note=""):
    """rows: [(label, value, colour)] as horizontal bars of overall accuracy."""
    height = 30 + 22 * len(rows)
    parts = []
    for i, (label, value, colour) in enumerate(rows):
        y = 20 + 22 * i
        parts.append(f"<text x='270' y='{y + 13}' font-size='10' text-anchor='end'>{esc(label)}</text>"
                     f"<rect x='276' y='{y + 3}' width='{3 * max(value, 0):.1f}' height='14' fill='{colour}'>"
                     f"<title>{esc(label)}: {value:.2f}</title></rect><text x='{280 + 3 * max(value, 0):.1f}' "
                     f"y='{y + 14}' font-size='9'>{value:.2f}</text>")
    return (f"<figure><svg class='chart' width='620' height='{height}' viewBox='0 0 620 {height}' role='img'>"
            f"<title>{esc(title)}</title>{''.join(parts)}</svg><figcaption>{esc(title)}{esc(note)}</figcaption>"
            "</figure>")


def waterfall_chart(steps, title):
    """steps: [(label, accuracy)] from Table 4: each bar runs from the previous row's accuracy to its own."""
    values = [v for _, v in steps]
    chart = Chart(title, (0, len(steps)), (max(0, min(values) - 5), min(100, max(values) + 5)), "", "accuracy %",
                  width=max(W, 64 * len(steps) + 60))
    previous = values[0]
    for i, (label, value) in enumerate(steps):
        base = previous if i else chart.y0
        colour = "#555" if i == 0 else ("#2ca02c" if value >= previous else "#d62728")
        chart.bar(i + 0.15, 0.7, base, value, colour, f"{label}: {value:.2f} ({value - previous:+.2f})")
        chart.text(i + 0.5, value + (1.5 if value >= base else -3), f"{value - previous:+.1f}" if i else f"{value:.1f}",
                   size=9)
        chart.text(i + 0.5, chart.y0 - (chart.y1 - chart.y0) * 0.06, label.split(")")[0] + ")", size=9)
        previous = value
    return chart.svg()


def explanations_match(path, results):
    """Was explanations.html written with these results, from the same coarse.pt? (An evaluation with --explain 0
    leaves an older run's page in place; it is not linked then.)"""
    if not path.exists():
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(4096)
    return f"data-coarse='{results.get('meta', {}).get('coarse_digest')}'" in head


def write_report(run, quiet=False, results_file="results.json"):
    run = Path(run)
    results = json.loads((run / results_file).read_text(encoding="utf-8"))
    sections = []
    z = np.load(run / "predictions.npz") if (run / "predictions.npz").exists() else None
    # ---- the long tail and what logit adjustment and re-ranking do to it ----
    if z is not None and "class_counts" in z.files:
        sections.append(("The long tail: accuracy of each class against its training images",
                         "Each dot is a class. Left to right, classes with more training images; colours are the shot "
                         "groups. The classifier alone favours the head (right); logit adjustment lifts the tail "
                         "(left) at the head's cost; HLC's re-ranking gives back part of the head and keeps the tail.",
                         "".join(per_class_chart(z, v, t) for v, t in (("coarse", "classifier (coarse)"),
                                                                       ("coarse_la", "+ logit adjustment (coarse_la)"),
                                                                       ("hlc", "HLC (re-ranked)")))))
    # ---- the six variants ----
    v = results["variants"]
    sections.append(("The six variants by shot group",
                     "Mean per-class accuracy in each group, and plain top-1 overall.",
                     grouped_bars([(name, v[name]) for name in v], "variants: many / medium / few / overall")))
    # ---- the K and tau sweeps ----
    ks = [(k, r) for k, r in results["topk_sweep"].items()]
    k_ticks = [(i, k) for i, (k, _) in enumerate(ks)]
    k_chart = sweep_chart([(g, [(i, r[g]) for i, (_, r) in enumerate(ks)]) for g in ("overall", "many", "few")],
                          "K candidates re-ranked (K = 1 is coarse_la; 'all' is the descriptors alone)", "K", k_ticks)
    taus = [(float(t), r) for t, r in results["tau_sweep"].items()]
    tau_chart = sweep_chart([(f"{name} overall", [(t, r[name]["overall"]) for t, r in taus])
                             for name in ("coarse_la", "hlc")], "logit adjustment strength tau (Eq. 4)", "tau",
                            [(t, f"{t:g}") for t, _ in taus])
    sections.append(("Candidates and adjustment", "How many candidates HLC re-ranks, and how strongly the prior is "
                     "removed; the run's own values are K = {0} and tau = {1}.".format(results["k"], results["tau"]),
                     k_chart + tau_chart))
    # ---- training curves ----
    log = run / "log.jsonl"
    if log.exists():
        records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
        curves = "".join(curve_chart(records, key, title, label) for key, title, label in (
            ("loss", "training loss", "loss"), ("train_acc", "training accuracy (unmixed images)", "%"),
            ("lr", "learning rate", "lr")))
        if curves:
            sections.append(("Training (stage 03)", "One point per epoch, from log.jsonl.", curves))
    # ---- descriptor weights ----
    if z is not None and "desc_weights" in z.files:
        weights = z["desc_weights"]
        text = histogram_chart(weights[weights > 0], "learned descriptor weights (softmax per class)")
        kinds = results.get("descriptor_weights")
        if kinds:
            text += horizontal_bars([(kind, 100 * w, "#9467bd") for kind, w in kinds.items() if w is not None],
                                    "mean weight per planted kind, x 100 (uniform: " +
                                    f"{100 / max(1, weights.shape[1]):.0f})")
        sections.append(("What the descriptor weights learned", "Uniform weights would all sit at 1/M; learned ones "
                         "silence some descriptors and lean on others.", text))
    # ---- Table 4 and the compared systems, when the run holds them and they were made on the same data ----
    full = (run / results_file, results)
    ablations = {a for _, a, _ in make_tables.TABLE4_ROWS} - {"full"}
    if all((run / "ablation" / a / "results.json").exists() for a in ablations):
        files = [(p, json.loads(p.read_text(encoding="utf-8")))
                 for p in sorted((run / "ablation").glob("*/results.json"))]
        stale = make_tables.stale_rows(full, files)
        if stale:
            sections.append(("Table 4", f"Not drawn: {', '.join(str(p) for p, _ in stale)} were made on other data "
                             "than results.json (stale); `make tables` makes them again.", ""))
        else:
            steps = [(label, r["overall"]) for label, r in make_tables.table4_rows(run, results)]
            sections.append(("Table 4 as a waterfall", "Each bar is one ablation row; its height is the change from "
                             "the row before it (green: up, red: down).",
                             waterfall_chart(steps, "ablation, overall accuracy")))
    systems = sorted((run / "systems").glob("*/results.json")) if (run / "systems").exists() else []
    if systems:
        files = [(p, json.loads(p.read_text(encoding="utf-8"))) for p in systems]
        stale = dict(make_tables.stale_rows(full, files))
        bars = [("HLC", v["hlc"]["overall"], "#d62728")]
        for path, res in files:
            if path in stale:
                continue
            for name, r in res["variants"].items():
                bars.append((f"{res['system']}: {res.get('labels', {}).get(name, name)}"[:60], r["overall"], "#1f77b4"))
        note = (f" Left out, made on other data than results.json (stale; `make compare` makes them again): "
                f"{', '.join(str(p) for p in stale)}.") if stale else ""
        sections.append(("HLC beside the compared systems", "Overall accuracy on this run's evaluation split; "
                         "docs/systems.md gives each method's steps, learning rate and parameters." + note,
                         horizontal_bars(bars, "compared systems, overall accuracy")))
    body = "".join(f"<section><h2>{esc(h)}</h2><p>{esc(p)}</p><div class='row'>{c}</div></section>"
                   for h, p, c in sections)
    links = ("<a href='explanations.html'>explanations.html</a>: why HLC chose each class, for sample test images"
             if explanations_match(run / "explanations.html", results)
             else "no explanations.html of these results in this run")
    style = ("body{font-family:sans-serif;margin:1.2em;max-width:1500px;color:#222}h1{font-size:1.4em}"
             "h2{font-size:1.1em;margin:.6em 0 .2em}section{border-top:1px solid #ccc;padding-top:.3em}"
             ".row{display:flex;flex-wrap:wrap;gap:.6em}figure{margin:0}"
             "figcaption{font-size:.8em;color:#555;text-align:center}p{margin:.2em 0 .5em;font-size:.9em;color:#444}")
    check = ("<script>addEventListener('load',()=>{const s=[...document.querySelectorAll('svg.chart')];"
             "const ok=s.filter(e=>{const b=e.getBBox();return b.width>0&&b.height>0&&e.querySelectorAll("
             "'circle,rect,polyline').length>0;});document.body.dataset.charts=s.length;"
             "document.body.dataset.rendered=ok.length;});</script>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>HLC report: {esc(results['dataset'])}</title>"
            f"<style>{style}</style></head><body><h1>HLC on {esc(results['dataset'])}: {esc(results['num_test'])} "
            f"{esc(results['split'])} images, HLC {v['hlc']['overall']:.2f} % (zero-shot CLIP "
            f"{v['zero_shot']['overall']:.2f} %)</h1><p>{links}. Every number comes from the files of {esc(run)}.</p>"
            f"{body}{check}</body></html>")
    basics.atomic_write_text(run / "report.html", page)
    if not quiet:
        print(f"report: {len(sections)} sections -> {run / 'report.html'}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run directory holding results.json")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    args = p.parse_args(argv)
    write_report(args.run, args.quiet)


if __name__ == "__main__":
    basics.run_script(main)
