"""Stage 02: one pass of the frozen CLIP text encoder over all text; cached, normalised features.

Reads   corpus.json (stage 01) and the CLIP model.
Writes  text_features.pt: corpus (N x d) + corpus_labels (N) + corpus_norm (N, each feature's norm before it was
        normalised: VL-LTR's head reads raw sentence features), descriptors (C x M x d) + desc_mask (C x M),
        classname (C x d, the 80-template ensemble used for zero-shot and to initialise the classifier),
        logit_scale, meta (with a digest of these tensors, which stages 03 and 04 check). All float32. A class with
        no descriptor gets its class-name feature as its one descriptor. This is the only stage that runs the text
        encoder (paper section 3.2).

    python 02_cache_descriptors.py --corpus runs/places_lt/corpus.json --out runs/places_lt/text_features.pt \
        --model ViT-B-16-quickgelu --pretrained openai

Typical time: about 4 s on the toy world and 400 s at iNaturalist's size with a tiny text tower, on 2-core CPUs
(docs/speed.md); each distinct sentence goes through the tower once. ImageNet-LT is about 100k corpus sentences, 10k
descriptors and 80k prompts for the ViT-B/16 text tower, fewer distinct (not yet timed on a GPU; `make bench` gives
the text encoder's sentences/s).
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common


COPY_ROWS = 65536  # copies in slices: one gather of every prompt's row peaked 0.8 GB higher at iNaturalist's size


@torch.no_grad()
def encode_texts(model, tokenizer, sentences, device, batch_size, precision="auto", known=None):
    """Normalised text features (N, d) in float32, in input order; each feature's norm before normalising (N,); which
    rows the tokenizer cut (N, bool); and the row of each distinct sentence, to pass on as `known`.

    Each distinct sentence goes through the tower once. A repeat is copied from its first row, and a sentence an
    earlier call encoded (`known`: its rows and its three tensors) from there: stage 01 puts the 80 templates and the
    descriptors in the corpus too, so many class prompts and descriptors are copies. Encoded again, a sentence would
    differ by the rounding of another batch at most (on the toy world and at iNaturalist's size, not at all: the same
    text_features.pt bit for bit, docs/speed.md). The features are written into one preallocated array (a list of
    batches then a concatenation would need twice the memory: 1.5M sentences at iNaturalist's size)."""
    known_rows, known_tensors = known or ({}, None)
    first, todo, from_known, repeats = {}, [], [], []
    for j, s in enumerate(sentences):
        if s in first:
            repeats.append((j, first[s]))
            continue
        first[s] = j
        if s in known_rows:
            from_known.append((j, known_rows[s]))
        else:
            todo.append(j)
    width = known_tensors[0].shape[1] if known_tensors is not None else None
    feats = torch.empty(len(sentences), width) if width else None
    norms, cut = torch.empty(len(sentences)), torch.zeros(len(sentences), dtype=torch.bool)
    context = getattr(tokenizer, "context_length", 77)
    starts = range(0, len(todo), batch_size)
    for i in common.progress(starts, "text") if len(todo) >= 5000 else starts:
        rows = torch.tensor(todo[i:i + batch_size])
        batch = [sentences[j] for j in rows.tolist()]
        tokens = tokenizer(batch)
        cut[rows] = truncated(tokenizer, batch, tokens, context)
        with common.image_autocast(device, precision):  # the same switch for the text tower
            f = model.encode_text(tokens.to(device)).float()
        if feats is None:
            feats = torch.empty(len(sentences), f.shape[1])
        norms[rows] = f.norm(dim=-1).cpu()
        feats[rows] = F.normalize(f, dim=-1).cpu()
    for pairs, source in ((from_known, known_tensors), (repeats, (feats, norms, cut))):
        for i in range(0, len(pairs), COPY_ROWS):
            rows, sources = torch.tensor(pairs[i:i + COPY_ROWS]).T
            for tensor, source_tensor in zip((feats, norms, cut), source):
                tensor[rows] = source_tensor[sources]
    if cut.any():
        print(f"note: {int(cut.sum())} of {len(sentences)} sentences were longer than {context - 2} tokens and "
              "truncated")
    return feats, norms, cut, first


def truncated(tokenizer, texts, tokens, context):
    """Which sentences were longer than the context holds (bool). A sentence of exactly context - 2 tokens fills
    every slot too (start, its tokens, end), so the rows whose last slot is filled are checked again from their
    untruncated token count."""
    full = torch.nonzero(tokens[:, -1] != 0).flatten().tolist()
    cut = torch.zeros(len(texts), dtype=torch.bool)
    for j in full:  # a tokenizer without encode (Hugging Face models): every full row counts
        cut[j] = not hasattr(tokenizer, "encode") or len(tokenizer.encode(texts[j])) > context - 2
    return cut


def check_corpus(corpus, path):
    """corpus.json as the file contract has it (stage 01 writes it; a researcher may write one by hand): classnames
    [C], sentences and descriptors [C] lists of strings, meta with the dataset's name. Anything else stops here,
    naming the key and the class, not as a KeyError, and not as a string read one character a sentence."""
    if not isinstance(corpus, dict):
        raise SystemExit(f"{path}: expected an object with classnames, sentences, descriptors and meta, "
                         f"got {type(corpus).__name__}")
    missing = [k for k in ("classnames", "sentences", "descriptors", "meta") if k not in corpus]
    if missing:
        raise SystemExit(f"{path}: no {', '.join(missing)}. A corpus file holds classnames [C], sentences [C][*], "
                         "descriptors [C][<=M] and meta {\"dataset\": name} (stage 01 writes them; docs/outputs.md)")
    names = corpus["classnames"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SystemExit(f"{path}: classnames must be a non-empty list of strings")
    for key in ("sentences", "descriptors") + (("descriptors_raw",) if "descriptors_raw" in corpus else ()):
        lists = corpus[key]
        if not isinstance(lists, list) or len(lists) != len(names):
            size = len(lists) if isinstance(lists, list) else type(lists).__name__
            raise SystemExit(f"{path}: {len(names)} class names but {key} holds {size} lists (one per class)")
        for c, texts in enumerate(lists):
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise SystemExit(f"{path}: {key}[{c}] (class {names[c]!r}) must be a list of strings, "
                                 f"got {json.dumps(texts)[:80]}")
    if not isinstance(corpus["meta"], dict) or not isinstance(corpus["meta"].get("dataset"), str):
        raise SystemExit(f"{path}: meta must hold the name of the dataset it is for, {{\"dataset\": name}}")
    return corpus


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", required=True, help="corpus.json from stage 01")
    p.add_argument("--out", required=True, help="text_features.pt to write")
    p.add_argument("--model", default="ViT-B-16-quickgelu",
                   help="open_clip model name or config JSON (paper: ViT-B/16)")
    p.add_argument("--pretrained", default="openai", help="weights: hub tag, local file, or none (paper: OpenAI CLIP)")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto")
    p.add_argument("--batch-size", type=int, default=1024, help="sentences per text-encoder batch")
    p.add_argument("--precision", choices=sorted(common.PRECISIONS), default="auto",
                   help="text tower arithmetic: " + "; ".join(f"{k}: {v}" for k, v in common.PRECISIONS.items()))
    args = p.parse_args(argv)
    common.note_for_memory(f'FEATURE_ARGS="--batch-size {max(1, args.batch_size // 4)}" needs less')

    # ---- setup ----
    t0 = time.time()
    device = common.pick_device(args.device)
    corpus = check_corpus(common.read_json(args.corpus, "corpus file (--corpus)"), args.corpus)
    classnames, sentences, descriptors = corpus["classnames"], corpus["sentences"], corpus["descriptors"]
    num_classes = len(classnames)

    common.hold_run_lock(Path(args.out).parent, f"02_cache_descriptors.py -> {args.out}")

    # ---- model ----
    open_clip = common.import_open_clip()
    model, _, _, name = common.load_clip(args.model, args.pretrained, device)
    tokenizer = open_clip.get_tokenizer(name)
    embed_dim = model.text_projection.shape[-1] if model.text_projection is not None else model.visual.output_dim

    # ---- encode ----
    flat = [s for c in range(num_classes) for s in sentences[c]]
    labels = torch.tensor([c for c in range(num_classes) for _ in sentences[c]])
    corpus_feats, corpus_norm, corpus_cut, corpus_rows = encode_texts(model, tokenizer, flat, device, args.batch_size,
                                                                      args.precision)
    in_corpus = (corpus_rows, (corpus_feats, corpus_norm, corpus_cut))  # the prompts and descriptors it holds

    # zero-shot classifier: mean of the 80 template features per class (CLIP's prompt ensemble)
    from open_clip import OPENAI_IMAGENET_TEMPLATES
    prompts = [t(n) for n in classnames for t in OPENAI_IMAGENET_TEMPLATES]
    prompt_feats = encode_texts(model, tokenizer, prompts, device, args.batch_size, args.precision, in_corpus)[0]
    classname_feats = F.normalize(prompt_feats.view(num_classes, len(OPENAI_IMAGENET_TEMPLATES), -1).mean(1), dim=-1)

    m = max(1, max(len(d) for d in descriptors))
    flat_desc = [d for ds in descriptors for d in ds]
    desc_flat, _, desc_cut, _ = (encode_texts(model, tokenizer, flat_desc, device, args.batch_size, args.precision,
                                              in_corpus) if flat_desc else (None, None, torch.zeros(0), None))
    desc_feats = torch.zeros(num_classes, m, classname_feats.shape[1])
    desc_mask = torch.zeros(num_classes, m, dtype=torch.bool)
    raw = corpus.get("descriptors_raw", descriptors)
    texts, raw_texts, fallback, i = [], [], [], 0
    for c, ds in enumerate(descriptors):
        if ds:
            desc_feats[c, :len(ds)] = desc_flat[i:i + len(ds)]
            texts.append(list(ds))
            raw_texts.append(list(raw[c]))
        else:  # no descriptor (an empty list in the file, or no usable LLM answer): the class-name prompt stands in
            desc_feats[c, 0] = classname_feats[c]
            texts.append([f"(no descriptor: the class-name prompt ensemble of '{classnames[c]}')"])
            raw_texts.append([""])
            fallback.append(c)
        desc_mask[c, :max(1, len(ds))] = True
        i += len(ds)

    # ---- save ----
    tensors = dict(corpus=corpus_feats, corpus_labels=labels, descriptors=desc_feats, desc_mask=desc_mask,
                   classname=classname_feats, corpus_norm=corpus_norm)
    meta = common.make_meta("02_cache_descriptors", args, dataset=corpus["meta"]["dataset"], num_classes=num_classes,
                            model=name, pretrained=args.pretrained, embed_dim=int(embed_dim),
                            precision=common.effective_precision(device, args.precision),
                            model_fingerprint=common.model_fingerprint(args.model, args.pretrained),
                            classnames_digest=common.names_digest(classnames),
                            corpus_digest=common.file_digest(args.corpus),
                            digest=common.tensor_digest(*tensors.values()),
                            descriptor_fallback=fallback,
                            truncated={"corpus": int(corpus_cut.sum()), "descriptors": int(desc_cut.sum())})
    common.atomic_torch_save(dict(tensors, descriptor_texts=texts, descriptor_raw=raw_texts,
                                  logit_scale=float(model.logit_scale.exp()), meta=meta), args.out)
    print(f"text features: {len(flat)} corpus, {len(flat_desc)} descriptors (M = {m}), {num_classes} class prompts, "
          f"d = {embed_dim} in {time.time() - t0:.1f}s on {device} -> {args.out}")


if __name__ == "__main__":
    common.run_script(main)
