"""Stage 04: logit adjustment, top-K candidates, weighted-descriptor re-ranking, metrics, explanations.

Reads   the evaluation split (test; val for iNaturalist 2018), coarse.pt (stage 03), text_features.pt (stage 02).
Writes  results.json (every variant, the K sweep, shot groups, meta), results.md (the same as a table),
        predictions.npz (per image: label, logits, prior, descriptor scores, every variant's prediction: enough
        to recompute every number) and explanations.html (why some predictions were made, paper Figure 1c);
        with --feature-cache, plain CLIP's features of the split in that folder (read back by later runs).

    python 04_eval_hlc.py --dataset places_lt --data-root data/places_lt --features runs/places_lt/text_features.pt \
        --coarse runs/places_lt/coarse.pt --out runs/places_lt/results.json

One pass over the test images gives every variant: each batch goes through VPT-deep CLIP (HLC) and plain CLIP
(zero-shot baselines). With --feature-cache, plain CLIP's features come from an earlier run when it evaluated the
same images with the same model; a run without prompts and with a frozen tower needs no VPT pass. Under torchrun each process takes a contiguous shard of the test set; rank 0 gathers the
scores and writes every file. Typical time: the toy world 2.5 s on a 2-core CPU (720 images; expect zero-shot 61.1,
coarse_la 79.6, hlc 81.1). On Places-LT the paper reports zero-shot 37.9 and HLC 51.5 (kit not yet run there).
"""
import argparse
import base64
import copy
import html
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common

VARIANTS = ("zero_shot", "descriptors_zero_shot", "coarse", "coarse_la", "hlc_unweighted", "hlc")
K_SWEEP = (1, 3, 5, 7, 9, 11, "all")


def predict_all(arrays, k, tau):
    """Every variant's predictions from the stored (float16) arrays, so predictions.npz reproduces them exactly."""
    f = {name: arrays[name].astype(np.float32) for name in
         ("coarse_logits", "class_prior", "desc_scores", "desc_scores_unweighted", "zero_shot_logits",
          "zs_desc_scores_unweighted")}
    adjusted = common.logit_adjust(f["coarse_logits"], f["class_prior"], tau)  # Eq. 4
    preds = {
        "zero_shot": f["zero_shot_logits"].argmax(1),
        "descriptors_zero_shot": f["zs_desc_scores_unweighted"].argmax(1),
        "coarse": f["coarse_logits"].argmax(1),
        "coarse_la": adjusted.argmax(1),
        "hlc_unweighted": common.rerank(adjusted, f["desc_scores_unweighted"], k),
        "hlc": common.rerank(adjusted, f["desc_scores"], k),
    }
    sweep = {str(kk): common.rerank(adjusted, f["desc_scores"], adjusted.shape[1] if kk == "all" else kk)
             for kk in K_SWEEP}
    return preds, sweep, adjusted


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
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_explanations(path, chosen, samples, feats, adjusted, preds, labels, groups, classnames, descriptors,
                       desc_feats, desc_mask, w_llm, k):
    """One self-contained HTML file: image, top-K candidates, each candidate's descriptors ranked."""
    weights = common.descriptor_weights(w_llm, desc_mask)  # (C, M)
    group_names = ("many", "medium", "few")
    cards = []
    for i in chosen:
        v = F.normalize(torch.from_numpy(feats[i].astype(np.float32)), dim=-1)
        cand = np.argsort(-adjusted[i], kind="stable")[:k]
        rows = []
        for c in cand:
            m = int(desc_mask[c].sum())
            cos = desc_feats[c, :m] @ v
            contrib = weights[c, :m] * cos
            order = torch.argsort(contrib, descending=True)
            items = "".join(f"<li><span class=w>w={weights[c, j]:.3f} cos={cos[j]:.3f}</span> "
                            f"{html.escape(descriptors[c][j])}</li>" for j in order.tolist())
            mark = " chosen" if c == preds[i] else ""
            rows.append(f"<div class='cand{mark}' data-class='{c}'><b>{html.escape(classnames[c])}</b> "
                        f"<span class=w>adjusted logit {adjusted[i, c]:.2f} · score {float(contrib.sum()):.4f}"
                        f"</span><ol>{items}</ol></div>")
        ok = preds[i] == labels[i]
        cards.append(
            f"<section class='{'ok' if ok else 'bad'}' data-index='{i}' data-pred='{preds[i]}' data-label='{labels[i]}'>"
            f"<img src='{thumbnail(samples[i][0])}' alt='test image {i}'>"
            f"<div><p><b>{'correct' if ok else 'wrong'}</b>: predicted <b>{html.escape(classnames[preds[i]])}</b>, "
            f"truth <b>{html.escape(classnames[labels[i]])}</b> ({group_names[groups[labels[i]]]}-shot class) "
            f"<span class=w>test image {i}: {html.escape(samples[i][2])}</span></p>{''.join(rows)}</div></section>")
    style = ("body{font-family:sans-serif;margin:1em;max-width:70em}section{display:flex;gap:1em;border-top:1px solid "
             "#ccc;padding:.8em 0}section.ok{background:#f4fbf4}section.bad{background:#fbf4f4}img{width:160px;height:"
             "fit-content}.cand{margin:.3em 0}.cand.chosen b{color:#06c}.w{color:#666;font-size:.85em}ol{margin:.2em 0 "
             ".4em 1em;padding-left:1em;font-size:.9em}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>HLC explanations</title><style>{style}</style>"
            f"</head><body><h1>Why HLC chose each class</h1><p>Top-{k} candidates by logit-adjusted classifier score "
            f"(Eq. 4); each candidate's descriptors ranked by weighted similarity w·cos (Algorithm 1). The chosen "
            f"candidate is blue.</p>{''.join(cards)}</body></html>")
    common.atomic_write_text(path, page)


def planted_weight_means(kinds_path, classnames, descriptor_texts, w_llm, mask):
    """Mean learned weight of each planted kind of descriptor (toy world: descriptor_kinds.json)."""
    kinds = json.loads(Path(kinds_path).read_text())
    weights = common.descriptor_weights(w_llm, mask)
    by_kind = {}
    for c, name in enumerate(classnames):
        for m, text in enumerate(descriptor_texts[c]):
            kind = kinds.get(name, {}).get(text)
            if kind:
                by_kind.setdefault(kind, []).append(float(weights[c, m]))
    means = {kind: round(float(np.mean(v)), 4) for kind, v in sorted(by_kind.items())}
    distractors = [w for kind, v in by_kind.items() if kind != "visual" for w in v]
    means["distractor"] = round(float(np.mean(distractors)), 4) if distractors else None
    return means


def results_table(results):
    lines = [f"# HLC results: {results['dataset']} ({results['num_test']} test images, K = {results['k']}, "
             f"tau = {results['tau']}, shot rule {results['shot_rule']})", "",
             "| variant | many | medium | few | overall |", "| --- | --- | --- | --- | --- |"]
    fmt = lambda x: "-" if x is None else f"{x:.2f}"
    for name, r in list(results["variants"].items()) + [(f"K = {k}", r) for k, r in results["topk_sweep"].items()]:
        lines.append(f"| {name} | {fmt(r['many'])} | {fmt(r['medium'])} | {fmt(r['few'])} | {fmt(r['overall'])} |")
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
    p.add_argument("--shot-rule", choices=sorted(common.SHOT_RULES), default="lift",
                   help="many/medium/few thresholds: lift (>100, 20-100, <20) or vl-ltr (>=100, <=20)")
    p.add_argument("--explain", type=int, default=24, help="test images shown in explanations.html (0: none)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--workers", type=int, default=8, help="data loader worker processes")
    p.add_argument("--decode", choices=sorted(common.DECODE_MODES), default="pil",
                   help="where images are decoded and resized (see stage 03's --decode)")
    p.add_argument("--feature-cache", default="",
                   help="folder for plain CLIP's features of the evaluation split (the zero-shot tower), reused by "
                        "later runs, such as the ablation rows")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto")
    p.add_argument("--seed", type=int, default=0, help="seed for picking the explained images")
    args = p.parse_args(argv)

    # ---- setup ----
    t0 = time.time()
    rank, world, device = common.init_distributed(args.device)
    out = Path(args.out)
    text = common.load_checkpoint(args.features, "stage 02 (02_cache_descriptors.py)")
    coarse = common.load_checkpoint(args.coarse, "stage 03 (03_train_coarse.py)")
    classnames = common.class_names(args.dataset, args.data_root)
    num_classes = len(classnames)
    model_name = common.resolve_model_name(args.model)
    for meta, path in ((text["meta"], args.features), (coarse["meta"], args.coarse)):
        common.check_meta(meta, path, num_classes=num_classes, model=model_name, pretrained=args.pretrained)

    # ---- data ----
    split = args.split or common.dataset_info(args.dataset)["eval_split"]
    samples = common.read_split(args.data_root, args.dataset, split, num_classes)

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
    w_cls, w_llm = coarse["w_cls"].to(device), coarse["w_llm"].to(device)
    desc_feats, desc_mask = text["descriptors"].to(device), text["desc_mask"].to(device)
    weighted_proto = (common.descriptor_weights(w_llm, desc_mask).unsqueeze(-1) * desc_feats).sum(1)  # (C, d)
    plain_proto = (common.descriptor_weights(torch.zeros_like(w_llm), desc_mask).unsqueeze(-1) * desc_feats).sum(1)
    classname = text["classname"].to(device)

    # ---- features: plain CLIP (zero-shot) from the cache when there; VPT-deep unless it is plain CLIP too ----
    cache = None
    if args.feature_cache:
        cache = common.feature_cache_file(args.feature_cache, split, samples, model_name, args.pretrained,
                                          coarse.get("image_size"), preprocess_val)
    plain = torch.load(cache, weights_only=True) if cache and cache.exists() else None  # name hashes the inputs
    towers = {} if plain is not None else {"plain": clip.visual}
    if vpt.num_tokens or coarse.get("visual"):
        towers["hlc"] = vpt
    feats = common.encode_split(towers, samples, preprocess_val, device, rank, world, args.batch_size, args.workers,
                                args.decode, desc="eval")
    if world > 1:
        torch.distributed.destroy_process_group()
        if rank != 0:
            return
    if plain is None:
        plain = feats["plain"]
        if cache:
            common.atomic_torch_save(plain, cache)
    hlc_feats = feats.get("hlc", plain)
    print(f"image features: {' and '.join(towers) or 'no tower'} run over {len(samples)} images "
          f"({args.decode} decoding); plain CLIP {'computed' if 'plain' in towers else f'from {cache}'}"
          f"{'' if 'hlc' in towers else '; HLC features = plain CLIP (no prompts, frozen tower)'}")

    # ---- scores, in batches on the device ----
    keys = ("coarse_logits", "zero_shot_logits", "desc_scores", "desc_scores_unweighted", "zs_desc_scores",
            "zs_desc_scores_unweighted")
    parts = {k: [] for k in keys}
    for lo in range(0, len(samples), args.batch_size):
        v, v0 = hlc_feats[lo:lo + args.batch_size].to(device), plain[lo:lo + args.batch_size].to(device)
        batch = {"coarse_logits": common.cosine_logits(v, w_cls, coarse["scale"]),
                 "zero_shot_logits": text["logit_scale"] * v0 @ classname.T,
                 "desc_scores": v @ weighted_proto.T, "desc_scores_unweighted": v @ plain_proto.T,
                 "zs_desc_scores": v0 @ weighted_proto.T, "zs_desc_scores_unweighted": v0 @ plain_proto.T}
        for k in keys:
            parts[k].append(batch[k].half().cpu())
    arrays = {k: torch.cat(parts[k]).numpy() for k in keys}
    arrays["labels"] = np.array([y for _, y, _ in samples], dtype=np.int64)
    features = hlc_feats.numpy()
    counts = coarse["class_counts"].numpy()
    arrays["class_prior"] = common.class_prior(counts).astype(np.float16)

    # ---- metrics ----
    preds, sweep, adjusted = predict_all(arrays, args.k, args.tau)
    report = lambda pr: common.accuracy_report(pr, arrays["labels"], counts, args.shot_rule)
    results = dict(dataset=args.dataset, split=split, num_test=len(samples), k=args.k, tau=args.tau,
                   variants={name: report(preds[name]) for name in VARIANTS},
                   topk_sweep={k: report(pr) for k, pr in sweep.items()},
                   zero_shot_reweighted=report(arrays["zs_desc_scores"].astype(np.float32).argmax(1)),
                   shot_counts=common.shot_counts(counts, args.shot_rule), shot_rule=args.shot_rule)

    kinds = Path(args.data_root) / "descriptor_kinds.json"
    if kinds.exists():  # the toy world says which descriptors it planted as right, non-visual or wrong
        results["descriptor_weights"] = planted_weight_means(kinds, classnames, text["descriptor_texts"],
                                                             coarse["w_llm"], text["desc_mask"])

    # ---- save ----
    arrays.update({f"pred_{name}": preds[name].astype(np.int64) for name in VARIANTS})
    common.atomic_savez(out.with_name("predictions.npz"), **arrays)
    if args.explain:
        groups = common.shot_groups(counts, args.shot_rule)
        chosen = pick_examples(arrays["labels"], preds["hlc"], groups, args.explain, args.seed)
        write_explanations(out.with_name("explanations.html"), chosen, samples, features, adjusted, preds["hlc"],
                           arrays["labels"], groups, classnames, text["descriptor_texts"], text["descriptors"],
                           text["desc_mask"], coarse["w_llm"], min(args.k, num_classes))
    results["meta"] = common.make_meta("04_eval_hlc", args, dataset=args.dataset, num_classes=num_classes,
                                       model=model_name, pretrained=args.pretrained, seconds=round(time.time() - t0, 1))
    common.atomic_write_text(out.with_name("results.md"), results_table(results))
    common.atomic_write_json(out, results)
    v = results["variants"]
    print(f"{args.dataset} {split} ({len(samples)} images): zero-shot {v['zero_shot']['overall']:.2f}  "
          f"coarse {v['coarse']['overall']:.2f}  +LA {v['coarse_la']['overall']:.2f}  "
          f"HLC {v['hlc']['overall']:.2f} (many {v['hlc']['many']} / med {v['hlc']['medium']} / few {v['hlc']['few']})"
          f"  in {time.time() - t0:.1f}s -> {out}")


if __name__ == "__main__":
    main()
