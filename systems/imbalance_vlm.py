"""Imbalance-VLM (Wang et al., IJCV 2023, "Exploring vision-language models for imbalanced learning"), on the kit.

CLIP's visual tower stays frozen; all its output tokens (before ln_post and the projection) go through a light
decoder, 3 transformer blocks of the tower's width (4 heads, MLP ratio 0.5, qkv bias), whose CLS token feeds a
linear classifier. The decoder and the classifier are trained with one of the long-tail losses (one stage), and a
second stage may then re-balance the classifier on the frozen stage-1 model (cRT, LWS, MARC, DisAlign).

Reads   the train and evaluation splits, the CLIP model, text_features.pt (only to check that it fits: the method
        uses no text).
Writes  $(RUN)/systems/imbalance_vlm/: results.json (variants ivlm_<loss> and ivlm_<loss>_<stage2>), results.md,
        predictions.npz, log.jsonl, one checkpoint per finished stage (stage1_<loss>.pt, stage2_<loss>_<head>.pt),
        last.pt (the stage in progress; --resume).

    python -m systems.imbalance_vlm --dataset imagenet_lt --data-root /data/imagenet \
        --features runs/imagenet_lt/text_features.pt --out runs/imagenet_lt/systems/imbalance_vlm \
        --loss ce balanced_softmax --stage2 crt marc

By default the run gives the paper's headline recipes for ViT-B/16 (its Table 4): one stage with cross-entropy
(ivlm_ce) and two stages with DisAlign on it (ivlm_ce_disalign), plus MARC on it (ivlm_ce_marc, the "MARC + IVLM"
row of HLC's Table 2, which is the paper's ViT-L/14 number).

Where the kit departs from the original (Imbalance-VLM/Imbalance-VLM, whose defaults the flags follow):
- The second stage trains on the stage-1 model's CLS features of the training images, encoded once with the
  evaluation transform; the original runs the tower and decoder on augmented images at every step of stage 2.
- Evaluation uses CLIP's evaluation transform (resize to the model's size, centre crop); the original resizes to
  256 and crops 224. The decoder blocks are open_clip's (LayerNorm eps 1e-5; timm's Block uses 1e-6).
- As in the code: LDAM subtracts its margins from the raw logits with no scale s; cRT continues training the
  stage-1 classifier with class-balanced sampling (the code's CLIP path never re-initialises it; --crt-reinit does,
  as Kang et al.); MARC and DisAlign train with the GRW loss and instance sampling, cRT and LWS with cross-entropy
  and class-balanced sampling.

Published (ViT-B/16, overall only, IVLM Table 4): ImageNet-LT 68.14 (one stage) / 73.23 (two stages); Places-LT
37.4 / 46.78; iNaturalist 2018 51.35 / 59.22. Toy world, 2-core CPU: see the README ("Compared systems").
"""
import argparse
import copy
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

LOSSES = ("ce", "balanced_softmax", "focal", "ldam", "lade", "cbw", "grw")
STAGE2 = ("crt", "lws", "marc", "disalign")


# ---- the one-stage losses (pi = training class prior, n = class counts), as the original code computes them ----

def balanced_softmax(logits, y, prior):
    """Ren et al. 2020: cross-entropy on z + log(pi)."""
    return F.cross_entropy(logits + torch.log(prior), y)


def focal(logits, y, gamma=2.0):
    """Lin et al. 2017: -(1 - p_y)^gamma log p_y."""
    log_p = F.log_softmax(logits, dim=-1).gather(1, y[:, None]).squeeze(1)
    return (-(1 - log_p.exp()) ** gamma * log_p).mean()


def ldam_margins(counts, max_margin=0.5):
    """Cao et al. 2019: margin_c proportional to n_c^(-1/4), the largest max_margin."""
    m = 1.0 / torch.as_tensor(counts, dtype=torch.float64).clamp(min=1) ** 0.25
    return (m * (max_margin / m.max())).float()


def ldam(logits, y, margins):
    """The target logit lowered by its class margin (the code applies no scale s)."""
    return F.cross_entropy(logits - F.one_hot(y, logits.shape[1]) * margins[y][:, None], y)


def lade(logits, y, prior, remine_lambda=0.1, weight=0.1):
    """Hong et al. 2021, as the code computes it: with s = z + log(pi) (the balanced-softmax logits) over a batch of B,
    per class c: first_c = mean of s_c over the images of class c, second_c = logsumexp_i (z_ic - log C) - log B;
    loss = CE(s, y) + weight * -sum_c pi_c (first_c - second_c - remine_lambda * second_c^2)."""
    num_classes = logits.shape[1]
    shifted = logits + torch.log(prior)  # the balanced-softmax logits
    members = (y[None, :] == torch.arange(num_classes, device=y.device)[:, None]).float()  # (C, B)
    first = (shifted.T * members).sum(1) / (members.sum(1) + 1e-8)
    spread = (shifted - torch.log(prior + 1e-9) + math.log(1.0 / num_classes + 1e-9)).T  # (C, B)
    second = torch.logsumexp(spread, dim=1) - math.log(logits.shape[0])
    regulariser = -((first - second - remine_lambda * second ** 2) * prior).sum()
    return F.cross_entropy(shifted, y) + weight * regulariser


def reweighted(logits, y, weights):
    return F.cross_entropy(logits, y, weight=weights)


def class_weights(prior, kind):
    """cbw: N / (C n_c); grw (Zhang et al. 2021): pi^-1.2 normalised to mean 1."""
    if kind == "cbw":
        return (1.0 / (len(prior) * prior)).float()
    w = prior ** -1.2
    return (w / w.sum() * len(prior)).float()


def stage1_loss(kind, logits, y, prior, margins):
    if kind == "ce":
        return F.cross_entropy(logits, y)
    if kind == "balanced_softmax":
        return balanced_softmax(logits, y, prior)
    if kind == "focal":
        return focal(logits, y)
    if kind == "ldam":
        return ldam(logits, y, margins)
    if kind == "lade":
        return lade(logits, y, prior)
    return reweighted(logits, y, class_weights(prior, kind))


# ---- the model ----

def tower_tokens(visual, images):
    """All output tokens of the frozen visual tower, before ln_post and the projection: (B, 1 + P, width)."""
    return visual.transformer(visual._embeds(images))


class Decoder(nn.Module):
    """Tokens -> depth transformer blocks (heads, MLP ratio, qkv bias) -> CLS feature -> Linear(width, C)."""

    def __init__(self, width, num_classes, depth=3, heads=4, mlp_ratio=0.5):
        super().__init__()
        from open_clip.transformer import ResidualAttentionBlock
        self.blocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, mlp_ratio=mlp_ratio, batch_first=True)
                                      for _ in range(depth)])
        self.classifier = nn.Linear(width, num_classes)

    def features(self, tokens):
        return self.blocks(tokens)[:, 0]

    def forward(self, tokens):
        return self.classifier(self.features(tokens))


class SecondStage(nn.Module):
    """A re-balanced classifier on the frozen stage-1 features f and logits z = W f + b.
    crt: W, b retrained; lws: s_c z_c (Kang et al. 2020); marc: a_c z_c + b_c ||W_c|| (Wang et al. 2022);
    disalign: (1 + sigma(w.f) s_c) z_c + sigma(w.f) b_c (Zhang et al. 2021)."""

    def __init__(self, kind, classifier, reinit=False):
        super().__init__()
        self.kind = kind
        self.classifier = copy.deepcopy(classifier).requires_grad_(kind == "crt")
        num_classes, width = classifier.weight.shape
        if kind == "crt" and reinit:
            self.classifier.reset_parameters()
        if kind in ("lws", "disalign"):
            self.scale = nn.Parameter(torch.ones(num_classes))
        if kind in ("marc", "disalign"):
            self.shift = nn.Parameter(torch.zeros(num_classes))
        if kind == "marc":
            self.a = nn.Parameter(torch.ones(num_classes))
            self.register_buffer("w_norm", classifier.weight.detach().norm(dim=1))
        if kind == "disalign":
            self.confidence = nn.Linear(width, 1)

    def forward(self, f):
        z = self.classifier(f)
        if self.kind == "lws":
            return self.scale * z
        if self.kind == "marc":
            return self.a * z + self.shift * self.w_norm
        if self.kind == "disalign":
            c = torch.sigmoid(self.confidence(f))  # (B, 1)
            return (1 + c * self.scale) * z + c * self.shift
        return z


class Towers(nn.Module):
    """The frozen tower once, then every stage-1 decoder: (B, n_models x width) CLS features for one pass."""

    def __init__(self, visual, decoders):
        super().__init__()
        self.visual, self.decoders = visual, nn.ModuleList(decoders)

    def forward(self, images):
        tokens = tower_tokens(self.visual, images)
        return torch.cat([d.features(tokens.float()) for d in self.decoders], dim=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="imagenet_lt, places_lt, inat2018, or any name (generic layout)")
    p.add_argument("--data-root", required=True, help="dataset root")
    p.add_argument("--features", required=True, help="text_features.pt from stage 02 (checked to fit; not used)")
    p.add_argument("--out", required=True, help="folder to write (results.json, predictions.npz, checkpoints)")
    p.add_argument("--model", default="ViT-B-16-quickgelu", help="open_clip model name or config JSON (paper: ViT-B/16 "
                                                                 "and ViT-L/14)")
    p.add_argument("--pretrained", default="openai", help="hub tag, local file, or none (must match)")
    p.add_argument("--loss", nargs="+", choices=LOSSES, default=["ce"],
                   help="one-stage losses, one model each (paper's headline: ce)")
    p.add_argument("--stage2", nargs="*", choices=STAGE2, default=["disalign", "marc"],
                   help="second stages on each stage-1 model (paper's headline two-stage: disalign; HLC Table 2: marc)")
    p.add_argument("--crt-reinit", action="store_true", help="cRT re-initialises the classifier (Kang et al.; the "
                                                                 "code's CLIP path keeps the stage-1 classifier)")
    p.add_argument("--iterations", type=int, default=8192, help="steps per stage (code: 8192)")
    p.add_argument("--epochs", type=int, default=0, help="instead of --iterations: this many epochs per stage")
    p.add_argument("--warmup", type=int, default=512, help="linear warm-up steps of 8192, scaled with the schedule "
                                                           "(code: 512)")
    p.add_argument("--lr", type=float, default=0.03, help="SGD learning rate, cosine to 0 (code: 0.03)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (code: 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (code: 5e-4)")
    p.add_argument("--clip-grad", type=float, default=1.0, help="gradient norm clipping (code: 1.0)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (code: 256)")
    p.add_argument("--depth", type=int, default=3, help="decoder blocks (paper: 3)")
    p.add_argument("--heads", type=int, default=4, help="decoder attention heads (paper: 4)")
    p.add_argument("--mlp-ratio", type=float, default=0.5, help="decoder MLP ratio (code: 0.5)")
    common.add_system_run_args(p)
    args = p.parse_args(argv)

    # ---- setup ----
    device, out = common.system_setup(args, "imbalance_vlm")

    # ---- data ----
    classnames, text, samples, counts, split, test = common.system_data(args)
    num_classes = len(classnames)
    labels = torch.tensor([y for _, y, _ in samples])
    prior = torch.from_numpy(common.class_prior(counts)).to(device)  # (C,) float64
    margins = ldam_margins(counts).to(device)

    # ---- model: the frozen tower, a decoder per one-stage loss ----
    clip, _, preprocess_val, model_name = common.load_clip(args.model, args.pretrained, device)
    common.drop_text_tower(clip)
    visual = clip.visual
    width = visual.conv1.out_channels
    decoders = {loss: Decoder(width, num_classes, args.depth, args.heads, args.mlp_ratio).to(device)
                for loss in args.loss}
    meta = common.make_meta("systems.imbalance_vlm", args, dataset=args.dataset, num_classes=num_classes,
                            model=model_name, pretrained=args.pretrained, classnames_digest=common.names_digest(classnames),
                            train_split_digest=common.split_digest(samples, args.data_root),
                            text_features_digest=text["meta"]["digest"])
    ckpt = common.PhaseCheckpoints(out, meta, args, args.resume)
    steps_per_epoch = len(samples) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the training set ({len(samples)} images)")
    total_steps = args.epochs * steps_per_epoch if args.epochs else args.iterations
    warmup = round(args.warmup * total_steps / 8192)
    chunks = [min(steps_per_epoch, total_steps - s) for s in range(0, total_steps, steps_per_epoch)]  # checkpointed
    print(f"Imbalance-VLM on {args.dataset}: frozen tower {common.count_parameters(visual)[0] / 1e6:.2f}M, decoder "
          f"{common.count_parameters(next(iter(decoders.values())))[0] / 1e6:.2f}M per loss ({', '.join(args.loss)}); "
          f"{total_steps} steps of {args.batch_size} per stage, second stages: {', '.join(args.stage2) or 'none'}")

    def run_stage(phase, module, draw_batch, loss_of):
        """SGD, warm-up then cosine to 0, gradient clipping; a checkpoint per chunk of steps_per_epoch steps."""
        params = [q for q in module.parameters() if q.requires_grad]
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        modules = {"model": module}
        for chunk in range(ckpt.start(phase, modules, optimizer), len(chunks)):
            t, losses, step0 = time.time(), [], sum(chunks[:chunk])
            module.train()
            for i, batch in enumerate(draw_batch(chunk, chunks[chunk])):
                for group in optimizer.param_groups:
                    group["lr"] = common.lr_at(step0 + i, total_steps, warmup, args.lr)
                loss = loss_of(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
                optimizer.step()
                losses.append(loss.detach())
            mean = torch.stack(losses).mean().item()
            if not math.isfinite(mean):
                raise SystemExit(f"{phase}: loss is {mean} after {step0 + chunks[chunk]} steps; try a lower --lr")
            print(f"{phase} {step0 + chunks[chunk]}/{total_steps} steps loss {mean:.4f} {time.time() - t:.1f}s",
                  flush=True)
            ckpt.epoch_done(phase, chunk + 1, modules, optimizer, dict(steps=step0 + chunks[chunk],
                                                                        loss=round(mean, 5),
                                                                        seconds=round(time.time() - t, 2)))
        ckpt.finish(phase, modules)
        module.eval()

    def instance_batches(chunk, steps):  # a fresh permutation per chunk of steps (the code's RandomSampler)
        perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed * 1000 + chunk))
        return list(perm[:steps * args.batch_size].split(args.batch_size))

    def balanced_batches(chunk, steps):  # WeightedRandomSampler with weights 1 / n_c (the code's "cbs")
        return common.weighted_batches(labels, 1.0 / np.maximum(counts, 1), args.batch_size, steps * args.batch_size,
                                       torch.Generator().manual_seed(args.seed * 1000 + chunk))

    # ---- stage 1: a decoder and classifier per loss, on the frozen tower's tokens of augmented images ----
    sampler = common.Batches()
    loader, to_device = common.image_loader(samples, common.system_train_transform(preprocess_val), args.decode, device,
                                            seed=args.seed, workers=args.workers, batch_sampler=sampler)
    for loss_kind, decoder in decoders.items():
        done = ckpt.finished(f"stage1_{loss_kind}")
        if done:
            decoder.load_state_dict(done["modules"]["model"])
            print(f"stage 1 ({loss_kind}): loaded {out / f'stage1_{loss_kind}.pt'}")
            continue

        def image_batches(chunk, steps):
            sampler.batches = [[(chunk, j) for j in b.tolist()] for b in instance_batches(chunk, steps)]
            return loader

        def decoder_loss(batch):
            images, y = to_device(batch)
            with torch.no_grad(), common.image_autocast(device):
                tokens = tower_tokens(visual, images)
            return stage1_loss(loss_kind, decoder(tokens.float()), y, prior, margins)

        run_stage(f"stage1_{loss_kind}", decoder, image_batches, decoder_loss)

    # ---- stage 2: re-balanced classifiers on the stage-1 models' features (encoded once) ----
    towers = Towers(visual, list(decoders.values())).eval()
    heads = {}
    if args.stage2:
        train_feats = common.encode_split({"f": towers}, samples, preprocess_val, device, workers=args.workers,
                                          desc="encode train", normalize=False)["f"].to(device)
        labels_device = labels.to(device)
    for m, (loss_kind, decoder) in enumerate(decoders.items()):
        for kind in args.stage2:
            phase = f"stage2_{loss_kind}_{kind}"
            head = SecondStage(kind, decoder.classifier, args.crt_reinit).to(device)
            heads[(loss_kind, kind)] = head
            done = ckpt.finished(phase)
            if done:
                head.load_state_dict(done["modules"]["model"])
                continue
            feats = train_feats[:, m * width:(m + 1) * width]
            grw = class_weights(prior, "grw")
            head_loss = (lambda idx, h=head, f=feats: F.cross_entropy(h(f[idx]), labels_device[idx])) \
                if kind in ("crt", "lws") else (lambda idx, h=head, f=feats: reweighted(h(f[idx]), labels_device[idx],
                                                                                           grw))
            draw = balanced_batches if kind in ("crt", "lws") else instance_batches
            run_stage(phase, head, lambda chunk, steps: [b.to(device) for b in draw(chunk, steps)], head_loss)

    # ---- evaluation: one pass of the tower and every decoder over the test images ----
    feats = common.encode_split({"f": towers}, test, preprocess_val, device, workers=args.workers, desc="eval",
                                normalize=False)["f"].to(device)
    preds = {}
    with torch.no_grad():
        for m, (loss_kind, decoder) in enumerate(decoders.items()):
            f = feats[:, m * width:(m + 1) * width]
            preds[f"ivlm_{loss_kind}"] = decoder.classifier(f).argmax(1).cpu().numpy()
            for kind in args.stage2:
                preds[f"ivlm_{loss_kind}_{kind}"] = heads[(loss_kind, kind)](f).argmax(1).cpu().numpy()
    names = {"ce": "cross-entropy", "balanced_softmax": "Balanced Softmax", "focal": "focal", "ldam": "LDAM",
             "lade": "LADE", "cbw": "class-balanced weights", "grw": "GRW", "crt": "cRT", "lws": "LWS", "marc": "MARC",
             "disalign": "DisAlign"}
    titles = {f"ivlm_{lk}": f"{names[lk]}, one stage" for lk in args.loss}
    titles.update({f"ivlm_{lk}_{k}": f"{names[lk]} + {names[k]}, two stages" for lk in args.loss for k in args.stage2})
    truth = np.array([y for _, y, _ in test])
    results = common.write_system_results(out, "Imbalance-VLM", preds, truth, counts, args.shot_rule, meta, titles)
    print(f"Imbalance-VLM on {args.dataset} {split}: " + ", ".join(
        f"{name} {r['overall']:.2f}" for name, r in results["variants"].items()) + f" -> {out}")


if __name__ == "__main__":
    common.run_script(main)
