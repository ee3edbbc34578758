"""Stage 04: logit adjustment, top-K candidates, weighted-descriptor re-ranking, metrics, explanations.

Reads   the evaluation split (test; val for iNaturalist 2018), coarse.pt (stage 03), text_features.pt (stage 02).
Writes  results.json (every variant, the K sweep, the tau sweep, shot groups, meta), results.md (the same as
        tables), predictions.npz (what every score is made of: image features, classifier, descriptor prototypes,
        class prior, K, tau, and every prediction; docs/outputs.md recomputes every number from it) and
        explanations.html (why some predictions were made, paper Figure 1c); with --feature-cache, plain CLIP's
        features of the split in that folder (read back by later runs).

    python 04_eval_hlc.py --dataset places_lt --data-root data/places_lt --features runs/places_lt/text_features.pt \
        --coarse runs/places_lt/coarse.pt --out runs/places_lt/results.json

One pass over the test images gives every variant: each batch goes through VPT-deep CLIP (HLC) and plain CLIP
(zero-shot baselines). Every score is then computed in float64 on the device, a batch of images at a time, from
the float32 arrays predictions.npz stores; no N x C score array is kept. With --feature-cache, plain CLIP's features
come from an earlier run when it evaluated the same images with the same model; a run without prompts and with a
frozen tower needs no VPT pass. Under torchrun each process takes a contiguous shard of the test set; rank 0 gathers
the features and writes every file. Typical time: the toy world 3.4 to 6.4 s on 2-core CPUs (720 images). On Places-LT
the paper reports zero-shot 37.9 and HLC 51.5 (kit not yet run there).
"""
import argparse
import base64
import copy
import html
import io
import time
from pathlib import Path

import numpy as np

import basics
import report

VARIANTS = ("zero_shot", "descriptors_zero_shot", "coarse", "coarse_la", "hlc_unweighted", "hlc")
K_SWEEP = (1, 3, 5, 7, 9, 11, "all")
TAU_SWEEP = (0.0, 0.5, 1.0, 1.5, 2.0)


def predict(arrays, k, tau, taus=TAU_SWEEP, device="cpu", batch_size=1024):
    """{name: predictions (N,)} for every variant, the K sweep (k1 ... kall) and the tau sweep (tau<t>_coarse_la,
    tau<t>_hlc), computed batch by batch in float64 on the device from exactly the arrays predictions.npz stores
    (numpy arrays: no tensor here needs a gradient)."""
    import torch
    import torch.nn.functional as F

    import common
    t = lambda name: torch.as_tensor(arrays[name]).to(device, torch.float64)
    w_cls, prior = F.normalize(t("w_cls"), dim=-1), t("class_prior")  # (C, d), (C,)
    proto, proto_plain, names = t("desc_proto"), t("desc_proto_unweighted"), t("classname_features")  # (C, d)
    kmax = max(kk for kk in K_SWEEP if kk != "all")
    parts = {}
    for lo in range(0, len(arrays["labels"]), batch_size):
        v = torch.as_tensor(arrays["hlc_features"][lo:lo + batch_size]).to(device, torch.float64)  # (B, d)
        v0 = torch.as_tensor(arrays["plain_features"][lo:lo + batch_size]).to(device, torch.float64)
        logits = float(arrays["scale"]) * v @ w_cls.T  # Eq. 1
        adjusted = common.logit_adjust(logits, prior, tau)  # Eq. 4
        scores, scores_plain = v @ proto.T, v @ proto_plain.T  # Algorithm 1 (learned / uniform weights)
        top = common.top_candidates(adjusted, kmax)  # candidates, best first; ties to the lower class index
        batch = {"zero_shot": (float(arrays["logit_scale"]) * v0 @ names.T).argmax(1),
                 "descriptors_zero_shot": (v0 @ proto_plain.T).argmax(1), "coarse": logits.argmax(1),
                 "coarse_la": adjusted.argmax(1), "hlc_unweighted": common.rerank(adjusted, scores_plain, k),
                 "hlc": common.rerank(adjusted, scores, k), "zero_shot_reweighted": (v0 @ proto.T).argmax(1)}
        # one top-K for the whole sweep. "all" re-ranks every class: the full model's descriptors alone (the
        # paper's N/A row is another model: make tables, ablation na); as rerank with K >= C, a tie goes to the
        # better-ranked class
        for kk in K_SWEEP:
            if kk == "all":
                batch["kall"] = common.rerank(adjusted, scores, adjusted.shape[1])
                continue
            cand = top[:, :kk]
            batch[f"k{kk}"] = cand.gather(1, scores.gather(1, cand).argmax(1, keepdim=True)).squeeze(1)
        for tt in taus:
            adj = common.logit_adjust(logits, prior, tt)
            batch[f"tau{tt:g}_coarse_la"], batch[f"tau{tt:g}_hlc"] = adj.argmax(1), common.rerank(adj, scores, k)
        for name, pred in batch.items():
            parts.setdefault(name, []).append(pred.cpu())
    return {name: torch.cat(p).numpy().astype(np.int64) for name, p in parts.items()}


# ---- explanations (paper Figure 1c) ----

def pick_examples(labels, preds, groups, n, seed):
    """Up to n test images: correct and wrong ones from each shot group, then any others."""
    rng = np.random.default_rng(seed)
    chosen = []
    per_cell = max(1, n // 6)
    for g in range(3):
        for correct in (True, False):
            cell = np.flatnonzero((groups[labels] == g) & ((preds == labels) == correct))
            chosen += list(rng.permutation(cell)[:per_cell])
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    chosen += list(rng.permutation(rest)[:max(0, n - len(chosen))])
    return sorted(int(i) for i in chosen[:n])


def thumbnail(path, size=160):
    import common
    im = common.open_rgb(path)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_explanations(path, chosen, samples, arrays, preds, groups, classnames, descriptors, desc_feats, desc_mask,
                       w_llm, k, tau, made_from):
    """One self-contained HTML file: image, top-K candidates, each candidate's descriptors ranked. `made_from` (the
    digest of coarse.pt) is kept in the page, so report.html links it only beside the results of the same model."""
    import torch
    import torch.nn.functional as F

    import common
    weights = common.descriptor_weights(w_llm, desc_mask)  # (C, M)
    w_cls = F.normalize(torch.from_numpy(arrays["w_cls"]).double(), dim=-1)
    prior = torch.from_numpy(arrays["class_prior"])
    labels, group_names = arrays["labels"], ("many", "medium", "few")
    cards = []
    for i in chosen:
        v = torch.from_numpy(arrays["hlc_features"][i]).double()
        adjusted = common.logit_adjust(float(arrays["scale"]) * w_cls @ v, prior, tau)  # (C,), Eq. 4
        rows = []
        for c in common.top_candidates(adjusted[None], k)[0].tolist():  # the candidates, as stage 04 ranks them
            m = int(desc_mask[c].sum())
            cos = desc_feats[c, :m].double() @ v
            contrib = weights[c, :m].double() * cos
            order = torch.argsort(contrib, descending=True)
            items = "".join(f"<li><span class=w>w={weights[c, j]:.3f} cos={cos[j]:.3f}</span> "
                            f"{html.escape(descriptors[c][j])}</li>" for j in order.tolist())
            mark = " chosen" if c == preds[i] else ""
            rows.append(f"<div class='cand{mark}' data-class='{c}'><b>{html.escape(classnames[c])}</b> "
                        f"<span class=w>adjusted logit {adjusted[c]:.2f} · score {float(contrib.sum()):.4f}"
                        f"</span><ol>{items}</ol></div>")
        ok = preds[i] == labels[i]
        cards.append(
            f"<section class='{'ok' if ok else 'bad'}' data-index='{i}' data-pred='{preds[i]}' "
            f"data-label='{labels[i]}'>"
            f"<img src='{thumbnail(samples[i][0])}' alt='test image {i}'>"
            f"<div><p><b>{'correct' if ok else 'wrong'}</b>: predicted <b>{html.escape(classnames[preds[i]])}</b>, "
            f"truth <b>{html.escape(classnames[labels[i]])}</b> ({group_names[groups[labels[i]]]}-shot class) "
            f"<span class=w>test image {i}: {html.escape(samples[i][2])}</span></p>{''.join(rows)}</div></section>")
    style = ("body{font-family:sans-serif;margin:1em;max-width:70em}section{display:flex;gap:1em;border-top:1px solid "
             "#ccc;padding:.8em 0}section.ok{background:#f4fbf4}section.bad{background:#fbf4f4}img{width:160px;height:"
             "fit-content}.cand{margin:.3em 0}.cand.chosen b{color:#06c}.w{color:#666;font-size:.85em}ol{margin:.2em 0 "
             ".4em 1em;padding-left:1em;font-size:.9em}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>HLC explanations</title><style>{style}</style>"
            f"</head><body data-coarse='{made_from}'><h1>Why HLC chose each class</h1><p>Top-{k} candidates by "
            f"logit-adjusted classifier score (Eq. 4); each candidate's descriptors ranked by weighted similarity "
            f"w·cos (Algorithm 1). The chosen candidate is blue.</p>{''.join(cards)}</body></html>")
    common.atomic_write_text(path, page)


def planted_weight_means(kinds_path, classnames, descriptor_raw, w_llm, mask):
    """Mean learned weight of each planted kind of descriptor (toy world: descriptor_kinds.json, keyed by the
    descriptors as the file wrote them, before stage 01 made sentences of them)."""
    import common
    kinds = common.read_json(kinds_path)
    weights = common.descriptor_weights(w_llm, mask)
    by_kind = {}
    for c, name in enumerate(classnames):
        for m, raw in enumerate(descriptor_raw[c]):
            kind = kinds.get(name, {}).get(raw)
            if kind:
                by_kind.setdefault(kind, []).append(float(weights[c, m]))
    means = {kind: round(float(np.mean(v)), 4) for kind, v in sorted(by_kind.items())}
    distractors = [w for kind, v in by_kind.items() if kind in ("nonvisual", "wrong") for w in v]
    means["distractor"] = round(float(np.mean(distractors)), 4) if distractors else None
    return means


def results_table(results):
    fmt = lambda x: "-" if x is None else f"{x:.2f}"
    row = lambda name, r: f"| {name} | {fmt(r['many'])} | {fmt(r['medium'])} | {fmt(r['few'])} | {fmt(r['overall'])} |"
    head = ["| variant | many | medium | few | overall |", "| --- | --- | --- | --- | --- |"]
    lines = [f"# HLC results: {results['dataset']} ({results['num_test']} test images, K = {results['k']}, "
             f"tau = {results['tau']}, shot rule {results['shot_rule']})", ""] + head
    lines += [row(name, r) for name, r in results["variants"].items()]
    lines += [row(f"K = {k}", r) for k, r in results["topk_sweep"].items()]
    lines += ["", f"Logit adjustment strength tau (Eq. 4), K = {results['k']}:", ""] + head
    for tt, r in results["tau_sweep"].items():
        lines += [row(f"tau = {tt}, coarse_la", r["coarse_la"]), row(f"tau = {tt}, hlc", r["hlc"])]
    if "descriptor_weights" in results:
        dw = results["descriptor_weights"]
        lines += ["", "Mean learned descriptor weight: " + ", ".join(f"{k} {v}" for k, v in dw.items()) + "."]
    counts = results["shot_counts"]
    lines += ["", f"Classes per group: many {counts['many']}, medium {counts['medium']}, few {counts['few']}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="imagenet_lt, places_lt, inat2018, or any name (generic layout)")
    p.add_argument("--data-root", required=True, help="dataset root")
    p.add_argument("--features", required=True, help="text_features.pt from stage 02")
    p.add_argument("--coarse", required=True, help="coarse.pt from stage 03")
    p.add_argument("--out", required=True, help="results.json to write; results.md, predictions.npz and "
                                                "explanations.html go next to it")
    p.add_argument("--model", default="ViT-B-16-quickgelu", help="open_clip model name or config JSON (must match)")
    p.add_argument("--pretrained", default="openai", help="hub tag, local file, or none (must match)")
    p.add_argument("--split", default="", help="split to evaluate (default: test; val for inat2018, as the papers)")
    p.add_argument("--k", type=int, default=5, help="candidates re-ranked by descriptors, top-K (paper: 5)")
    p.add_argument("--tau", type=float, default=1.0, help="logit adjustment strength, Eq. 4 (paper: 1)")
    p.add_argument("--shot-rule", choices=sorted(basics.SHOT_RULES), default="lift",
                   help="many/medium/few thresholds: lift (>100, 20-100, <20) or vl-ltr (>=100, <=20)")
    p.add_argument("--explain", type=int, default=24, help="test images shown in explanations.html (0: none)")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write report.html beside results.json (the ablation rows of make table4 do not)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--workers", type=int, default=8, help="data loader worker processes")
    p.add_argument("--decode", choices=sorted(basics.DECODE_MODES), default="pil",
                   help="where images are decoded and resized (see stage 03's --decode)")
    p.add_argument("--feature-cache", default="",
                   help="folder for plain CLIP's features of the evaluation split (the zero-shot tower), reused by "
                        "later runs, such as the ablation rows")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto")
    p.add_argument("--precision", choices=sorted(basics.PRECISIONS), default="auto",
                   help="image tower arithmetic: " + "; ".join(f"{k}: {v}" for k, v in basics.PRECISIONS.items()))
    p.add_argument("--seed", type=basics.seed_value, default=0, help="seed for picking the explained images")
    p.add_argument("--check-args", action="store_true",
                   help="check the arguments and stop: make runs this before the training, so that a typo in "
                        "EVAL_ARGS is found then and not after it")
    args = p.parse_args(argv)
    basics.note_for_memory(f'EVAL_ARGS="--batch-size {max(1, args.batch_size // 4)}" needs less')
    basics.refuse_out_of_range(args, least=[("--k", 1), ("--explain", 0), ("--batch-size", 1), ("--workers", 0)])
    basics.check_folder_to_be(args.feature_cache, "feature cache folder (--feature-cache, FEATURE_CACHE=)")
    if args.check_args:
        return
    # torch, and common, which imports it, only now: make checks the arguments before each training, and
    # importing torch takes 3 s on a 2-core CPU
    import torch

    import common

    # ---- setup ----
    t0 = time.time()
    rank, world, device = common.init_distributed(args.device)
    out = Path(args.out)
    if rank == 0:
        common.hold_run_lock(out.parent, f"04_eval_hlc.py -> {out}")
    classnames = common.class_names(args.dataset, args.data_root)
    num_classes = len(classnames)
    if args.k >= num_classes and rank == 0:
        print(f"note: K = {args.k} candidates cover all {num_classes} classes, so HLC chooses among every class by "
              "the descriptors alone (the K sweep's 'all' row); a short list to re-rank needs --k under the class "
              "count (Make: EVAL_ARGS=\"--k N\")", flush=True)
    model_name = common.resolve_model_name(args.model)
    text = common.load_text_features(args.features, classnames, args.data_root, args.model, args.pretrained, mmap=True)
    coarse = common.load_checkpoint(args.coarse, "stage 03 (03_train_coarse.py)")
    train = common.read_split(args.data_root, args.dataset, "train", num_classes, check_files=False)
    if isinstance(coarse, dict) and isinstance(coarse.get("meta"), dict):  # made for another run: said as that first
        common.check_meta(coarse["meta"], args.coarse, num_classes=num_classes, model=model_name,
                          pretrained=args.pretrained)
        facts = common.training_facts(classnames, train, args.data_root, text)  # shot groups, prior: from coarse.pt
        common.check_training_facts(args.coarse, coarse["meta"], facts, other=args.features)
    common.check_coarse(coarse, args.coarse, text)

    # ---- data ----
    split = args.split or common.dataset_info(args.dataset)["eval_split"]
    samples = common.read_split(args.data_root, args.dataset, split, num_classes)
    common.check_overlap(train, samples, split)

    # ---- model ----
    clip, _, preprocess_val, _ = common.load_clip(args.model, args.pretrained, device, coarse.get("image_size"))
    common.drop_text_tower(clip)
    visual = clip.visual
    if coarse.get("visual"):  # --finetune full: HLC uses the trained tower, zero-shot the original one
        visual = copy.deepcopy(clip.visual)
        visual.load_state_dict(coarse["visual"])
    vpt = common.PromptedVisual(visual, coarse["prompt_tokens"], coarse["prompt_depth"]).to(device).eval()
    with torch.no_grad():
        vpt.prompts.copy_(coarse["prompts"])

    # ---- features: plain CLIP (zero-shot) from the cache when there; VPT-deep unless it is plain CLIP too ----
    cache = None
    if args.feature_cache:
        cache = common.feature_cache_file(args.feature_cache, split, samples, text["meta"]["model_fingerprint"],
                                          args.pretrained,
                                          coarse.get("image_size"), preprocess_val,
                                          common.effective_precision(device, args.precision))
    plain = common.load_cached_features(cache, len(samples)) if cache else None  # its name hashes the inputs
    towers = {} if plain is not None else {"plain": clip.visual}
    if vpt.num_tokens or coarse.get("visual"):
        towers["hlc"] = vpt
    feats = common.encode_split(towers, samples, preprocess_val, device, rank, world, args.batch_size, args.workers,
                                args.decode, desc="eval", precision=args.precision)
    if world > 1:  # every process is done with the group; only rank 0 has work left
        common.finish_distributed()
        if rank != 0:
            common.exit_process(0)
    if plain is None:
        plain = feats["plain"]
        if cache:
            common.atomic_torch_save(plain, cache)
    print(f"image features: {' and '.join(towers) or 'no tower'} run over {len(samples)} images "
          f"({args.decode} decoding); plain CLIP {'computed' if 'plain' in towers else f'from {cache}'}"
          f"{'' if 'hlc' in towers else '; HLC features = plain CLIP (no prompts, frozen tower)'}")

    # ---- what every score is made of (float32, as stored), then every prediction from it (float64) ----
    w_llm, desc_feats, desc_mask = coarse["w_llm"], text["descriptors"].float(), text["desc_mask"]
    proto = lambda weights: (common.descriptor_weights(weights, desc_mask).unsqueeze(-1) * desc_feats).sum(1)
    counts = coarse["class_counts"].numpy()
    grouping = common.group_counts(args.dataset, counts)  # the counts that define the shot groups (usually counts)
    arrays = dict(labels=np.array([y for _, y, _ in samples], dtype=np.int64),
                  hlc_features=feats.get("hlc", plain).numpy().astype(np.float32),
                  plain_features=plain.numpy().astype(np.float32), w_cls=coarse["w_cls"].numpy().astype(np.float32),
                  scale=np.float64(coarse["scale"]), desc_proto=proto(w_llm).numpy().astype(np.float32),
                  desc_weights=common.descriptor_weights(w_llm, desc_mask).numpy().astype(np.float32),
                  desc_proto_unweighted=proto(torch.zeros_like(w_llm)).numpy().astype(np.float32),
                  classname_features=text["classname"].numpy().astype(np.float32),
                  logit_scale=np.float64(text["logit_scale"]), class_prior=common.class_prior(counts),
                  class_counts=counts.astype(np.int64), group_counts=grouping.astype(np.int64),
                  shot_rule=np.str_(args.shot_rule),
                  k=np.int64(args.k), tau=np.float64(args.tau))
    preds = predict(arrays, args.k, args.tau, device=device)

    # ---- metrics ----
    scored = lambda name: common.accuracy_report(preds[name], arrays["labels"], grouping, args.shot_rule)
    results = dict(dataset=args.dataset, split=split, num_test=len(samples), k=args.k, tau=args.tau,
                   variants={name: scored(name) for name in VARIANTS},
                   topk_sweep={str(kk): scored(f"k{kk}") for kk in K_SWEEP},
                   tau_sweep={f"{tt:g}": {v: scored(f"tau{tt:g}_{v}") for v in ("coarse_la", "hlc")}
                              for tt in TAU_SWEEP},
                   zero_shot_reweighted=scored("zero_shot_reweighted"),
                   shot_counts=common.shot_counts(grouping, args.shot_rule), shot_rule=args.shot_rule,
                   training=coarse.get("training"))
    kinds = Path(args.data_root) / "descriptor_kinds.json"
    if kinds.exists():  # the toy world says which descriptors it planted as right, non-visual or wrong
        results["descriptor_weights"] = planted_weight_means(kinds, classnames, text["descriptor_raw"], w_llm,
                                                             desc_mask)

    # ---- save ----
    coarse_digest = common.file_digest(args.coarse)
    common.atomic_savez(out.with_name("predictions.npz"), **arrays, **{f"pred_{n}": p for n, p in preds.items()})
    if args.explain:
        groups = common.shot_groups(grouping, args.shot_rule)
        chosen = pick_examples(arrays["labels"], preds["hlc"], groups, args.explain, args.seed)
        write_explanations(out.with_name("explanations.html"), chosen, samples, arrays, preds["hlc"], groups,
                           classnames, text["descriptor_texts"], desc_feats, desc_mask, w_llm,
                           min(args.k, num_classes), args.tau, coarse_digest)
    results["meta"] = common.make_meta("04_eval_hlc", args, dataset=args.dataset, num_classes=num_classes,
                                       model=model_name, pretrained=args.pretrained, seconds=round(time.time() - t0, 1),
                                       coarse_digest=coarse_digest, split=split,
                                       eval_split_digest=common.split_digest(samples, args.data_root),
                                       shot_rule=args.shot_rule,
                                       precision=common.effective_precision(device, args.precision), **facts)
    common.atomic_write_text(out.with_name("results.md"), results_table(results))
    common.atomic_write_json(out, results)
    if args.report:
        report.write_report(out.parent, quiet=True, results_file=out.name)
    v = results["variants"]
    print(f"{args.dataset} {split} ({len(samples)} images): zero-shot {v['zero_shot']['overall']:.2f}  "
          f"coarse {v['coarse']['overall']:.2f}  +LA {v['coarse_la']['overall']:.2f}  "
          f"HLC {v['hlc']['overall']:.2f} ({common.groups_line(v['hlc'])})"
          f"  in {time.time() - t0:.1f}s -> {out}")
    if world > 1:
        common.exit_process(0)


if __name__ == "__main__":
    basics.run_script(main)
