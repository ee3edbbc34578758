"""Imbalance-VLM (Wang et al., IJCV 2023, "Exploring vision-language models for imbalanced learning"), on the kit.

CLIP's visual tower stays frozen; all its output tokens (before ln_post and the projection) go through a light
decoder, 3 transformer blocks of the tower's width (4 heads, MLP ratio 0.5, qkv bias), whose CLS token feeds a
linear classifier. The decoder and the classifier are trained with one of the long-tail losses (one stage), and a
second stage may then re-balance the classifier on the frozen stage-1 model (cRT, LWS, MARC, DisAlign). Each stage
keeps its best weights on the val split (evaluated 32 times a stage), as the code does.

Reads   the train, val and evaluation splits, the CLIP model, text_features.pt (only to check that it fits: the method
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

The recipes follow the original code (Imbalance-VLM/Imbalance-VLM: scripts/config_generator_imb_clip.py,
imblearn/core/utils/build.py, imblearn/datasets/): SGD with Nesterov momentum, no weight decay on biases and 1-D
parameters (LWS's scales (C,) among them; MARC's a and b and DisAlign's scale and shift are (1, C) there, so they are
decayed), 512 warm-up steps then cos(7/16 pi t), which ends near 0.2 x the learning rate, not 0; no gradient clipping
(the config generator writes `clip: 1.0`, which the trainer never reads: it reads `clip_grad`, default 0); inputs
normalised with ImageNet's mean and std (iNaturalist: its own), not CLIP's; training crops RandomResizedCrop(0.08-1,
bilinear) with flips; its "class-balanced" sampler (sampler.py) draws weighted permutations without replacement, so
each image comes once per permutation and cRT and LWS rebalance only mildly. Where the kit departs from it:
- The second stage trains on the stage-1 model's CLS features of the training images, encoded once with the
  evaluation transform; the original runs the tower and decoder on augmented images at every step of stage 2.
- Evaluation uses CLIP's resize to the model's size and centre crop (with the code's normalisation); the original
  resizes to 256 and crops 224. The decoder blocks are open_clip's (LayerNorm eps 1e-5; timm's Block uses 1e-6).
- iNaturalist has no val split apart from the evaluated one: the last weights there (the code selects on it).
- As in the code: LDAM subtracts its margins from the raw logits with no scale s; cRT continues training the
  stage-1 classifier with class-balanced sampling (the code's CLIP path never re-initialises it; --crt-reinit does,
  as Kang et al.); MARC and DisAlign train with the GRW loss and instance sampling, cRT and LWS with cross-entropy
  and class-balanced sampling.

Published (ViT-B/16, overall only, IVLM Table 4): ImageNet-LT 68.14 (one stage) / 73.23 (two stages); Places-LT
37.4 / 46.78; iNaturalist 2018 51.35 / 59.22. Toy world: docs/systems.md.
"""
import argparse
import copy
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

if not __package__:  # run by path (python systems/<name>.py): the kit's modules are in the folder above
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from systems import frame  # noqa: E402

RECIPES = {
    # code: scripts/config_generator_imb_clip.py (num_train_iter 8192, num_warmup_iter 512, num_eval_iter 256,
    # batch_size 256, lr 0.03 for imagenet_lt, places and inaturalist alike)
    "default": dict(iterations=8192, evals=32, lr=0.03, batch_size=256, lr_scale=1.0, normalize="imagenet"),
    # imblearn/datasets/cv_datasets/inaturalist.py: iNaturalist's own mean and std (ImageNet's elsewhere)
    "inat2018": dict(normalize="inat"),
    # the toy world: the shared step budget (docs/systems.md), split evenly between the stages as the code's 8192 +
    # 8192; lr_scale picked by make tune-toy
    "toy": dict(iterations=500, evals=25, batch_size=32, lr_scale=1.0),  # 25 evaluations of 20 steps
}
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
    disalign: (1 + sigma(w.f) s_c) z_c + sigma(w.f) b_c (Zhang et al. 2021). Shapes as the code's (utils.py): LWS's
    scales (C,), so never weight-decayed; MARC's a, b and DisAlign's scale and shift (1, C), so decayed."""

    def __init__(self, kind, classifier, reinit=False):
        super().__init__()
        self.kind = kind
        self.classifier = copy.deepcopy(classifier).requires_grad_(kind == "crt")
        num_classes, width = classifier.weight.shape
        if kind == "crt" and reinit:
            self.classifier.reset_parameters()
        if kind == "lws":
            self.scale = nn.Parameter(torch.ones(num_classes))
        if kind == "disalign":
            self.scale = nn.Parameter(torch.ones(1, num_classes))
        if kind in ("marc", "disalign"):
            self.shift = nn.Parameter(torch.zeros(1, num_classes))
        if kind == "marc":
            self.a = nn.Parameter(torch.ones(1, num_classes))
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


def param_groups(module, weight_decay):
    """The code's param_groups_weight_decay: no weight decay on biases and 1-D parameters."""
    plain, no_decay = [], []
    for name, q in module.named_parameters():
        if q.requires_grad:
            (no_decay if q.ndim <= 1 or name.endswith(".bias") else plain).append(q)
    return [dict(params=no_decay, weight_decay=0.0), dict(params=plain, weight_decay=weight_decay)]


def cosine_7_16(step, total, warmup, base_lr):
    """The code's get_cosine_schedule_with_warmup: linear from 0 over the warm-up, then lr cos(7/16 pi t), t from 0 to 1
    (ending at cos(7 pi / 16) = 0.195 of the learning rate)."""
    if step < warmup:
        return base_lr * step / max(1, warmup)
    return base_lr * max(0.0, math.cos(math.pi * 7 / 16 * (step - warmup) / max(1, total - warmup)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    frame.add_io_args(p, "checked to fit; not used", "paper: ViT-B/16 and ViT-L/14")
    p.add_argument("--loss", nargs="+", choices=LOSSES, default=["ce"],
                   help="one-stage losses, one model each (paper's headline: ce)")
    p.add_argument("--stage2", nargs="*", choices=STAGE2, default=["disalign", "marc"],
                   help="second stages on each stage-1 model (paper's headline two-stage: disalign; HLC Table 2: marc)")
    p.add_argument("--crt-reinit", action="store_true", help="cRT re-initialises the classifier (Kang et al.; the "
                                                                 "code's CLIP path keeps the stage-1 classifier)")
    p.add_argument("--iterations", type=int, help=common.recipe_help(RECIPES, "iterations", "steps per stage"))
    p.add_argument("--epochs", type=int, help="instead of --iterations: this many epochs per stage (Make: EPOCHS)")
    p.add_argument("--lr", type=float, help=common.recipe_help(RECIPES, "lr", "SGD learning rate"))
    p.add_argument("--batch-size", type=int, help=common.recipe_help(RECIPES, "batch_size", "images per step"))
    p.add_argument("--warmup", type=int, default=512, help="linear warm-up steps of 8192, scaled with the schedule "
                                                           "(code: 512)")
    p.add_argument("--evals", type=int, help=common.recipe_help(
        RECIPES, "evals", "val evaluations per stage, the best kept (code: every 256 of 8192 steps)"))
    p.add_argument("--momentum", type=float, default=0.9, help="SGD Nesterov momentum (code: 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay, not on biases and 1-D "
                                                                     "parameters (code: 5e-4)")
    p.add_argument("--clip-grad", type=float, default=0.0,
                   help="gradient norm clipping, 0 = none (code: none; its config generator writes 'clip: 1.0', which "
                        "the trainer never reads: it reads clip_grad, default 0)")
    p.add_argument("--normalize", choices=["imagenet", "inat", "clip"], help=common.recipe_help(
        RECIPES, "normalize",
        "input mean and std: the code's dataset files (ImageNet's; iNaturalist's own), or CLIP's"))
    p.add_argument("--depth", type=int, default=3, help="decoder blocks (paper: 3)")
    p.add_argument("--heads", type=int, default=4, help="decoder attention heads (paper: 4)")
    p.add_argument("--mlp-ratio", type=float, default=0.5, help="decoder MLP ratio (code: 0.5)")
    frame.add_run_args(p, selection="best")
    args = p.parse_args(argv)

    # ---- setup ----
    device, out = frame.setup(args, "imbalance_vlm", RECIPES)
    base_lr = args.lr * args.lr_scale

    # ---- data ----
    classnames, text, samples, counts, val, split, test = frame.load_data(args)
    num_classes = len(classnames)
    labels = torch.tensor([y for _, y, _ in samples])
    prior = torch.from_numpy(common.class_prior(counts)).to(device)  # (C,) float64
    margins = ldam_margins(counts).to(device)
    batch = common.cap_batch(args.batch_size, len(samples))

    # ---- model: the frozen tower, a decoder per one-stage loss ----
    clip, _, preprocess_val, model_name = common.load_clip(args.model, args.pretrained, device)
    common.drop_text_tower(clip)
    visual = clip.visual
    common.vit_blocks(visual, "Imbalance-VLM's decoder (it reads the tower's patch tokens)")
    width = visual.conv1.out_channels
    decoders = {loss: Decoder(width, num_classes, args.depth, args.heads, args.mlp_ratio).to(device)
                for loss in args.loss}
    meta = frame.make_meta("systems.imbalance_vlm", args, classnames, samples, text, model_name, split, test)
    phases = frame.Phases(out, meta, args, args.resume, common.parser_defaults(p, args))
    steps_per_epoch = len(samples) // batch
    if args.epochs:  # an epoch per chunk
        chunks, chunk = args.epochs, steps_per_epoch
    else:  # the code evaluates every iterations / 32 steps: a chunk is that many steps
        chunks = args.evals
        chunk = max(1, round(args.iterations / chunks))
    total_steps = chunks * chunk
    warmup = round(args.warmup * total_steps / 8192)
    print(f"Imbalance-VLM on {args.dataset}: frozen tower {common.count_parameters(visual)[0] / 1e6:.2f}M, decoder "
          f"{common.count_parameters(next(iter(decoders.values())))[0] / 1e6:.2f}M per loss ({', '.join(args.loss)}); "
          f"{total_steps} steps of {batch} per stage, second stages: {', '.join(args.stage2) or 'none'}; weights "
          f"kept: {args.select}")

    def sgd(module):
        return torch.optim.SGD(param_groups(module, args.weight_decay), lr=base_lr, momentum=args.momentum,
                               nesterov=True)

    schedule = lambda step, total: cosine_7_16(step, total, warmup, base_lr)

    def instance_batches(chunk_index):  # fresh permutations each chunk of steps (the code's RandomSampler)
        return frame.weighted_batches(labels, np.ones(num_classes), batch, chunk * batch,
                                      torch.Generator().manual_seed(args.seed * 1000 + chunk_index), replacement=False)

    def balanced_batches(chunk_index):  # the code's "cbs": weights 1 / n_c, drawn without replacement (sampler.py)
        return frame.weighted_batches(labels, 1.0 / np.maximum(counts, 1), batch, chunk * batch,
                                      torch.Generator().manual_seed(args.seed * 1000 + chunk_index), replacement=False)

    # ---- stage 1: a decoder and classifier per loss, on the frozen tower's tokens of augmented images ----
    sampler = common.Batches()
    # the code's transforms (imagenet_lt.py, places.py, inaturalist.py): RandomResizedCrop(0.08-1, bilinear) and flips
    # for training, with its dataset's normalisation; evaluation is CLIP's resize and centre crop with the same one
    train_tf = frame.train_transform(preprocess_val, interpolation="bilinear", normalize=args.normalize)
    eval_tf = frame.eval_transform(preprocess_val, args.normalize)
    loader, to_device = common.image_loader(samples, train_tf, args.decode, device, seed=args.seed,
                                            workers=args.workers, batch_sampler=sampler)
    val_labels = torch.tensor([y for _, y, _ in val]).to(device) if val else None
    encode = lambda module, items, what: common.encode_split({"f": module}, items, eval_tf, device,
                                                             workers=args.workers, desc=what,
                                                             normalize=False)["f"].to(device)
    for loss_kind, decoder in decoders.items():
        phase = f"stage1_{loss_kind}"
        done = phases.finished(phase, chunks)
        if done:
            decoder.load_state_dict(done["modules"]["model"])
            continue

        def image_batches(chunk_index):
            sampler.batches = [[(chunk_index, j) for j in b.tolist()] for b in instance_batches(chunk_index)]
            return loader

        def decoder_loss(images_labels, decoder=decoder, loss_kind=loss_kind):
            images, y = to_device(images_labels)
            with torch.no_grad(), common.image_autocast(device):
                tokens = tower_tokens(visual, images)
            return stage1_loss(loss_kind, decoder(tokens.float()), y, prior, margins)

        def decoder_val(decoder=decoder):  # the tower and this decoder over the val images, as the code evaluates
            decoder.eval()
            acc = frame.accuracy(decoder.classifier, encode(Towers(visual, [decoder]), val, "val"), val_labels)
            decoder.train()
            return acc

        decoder.train()
        phases.run(phase, {"model": decoder}, sgd(decoder), chunks, image_batches, decoder_loss, schedule,
                   validate=decoder_val if val else None, clip_grad=args.clip_grad)
        decoder.eval()

    # ---- stage 2: re-balanced classifiers on the stage-1 models' features (encoded once) ----
    towers = Towers(visual, list(decoders.values())).eval()
    heads = {}
    if args.stage2:
        train_feats = encode(towers, samples, "encode train")
        val_feats = encode(towers, val, "val") if val else None
        labels_device = labels.to(device)
    for m, (loss_kind, decoder) in enumerate(decoders.items()):
        for kind in args.stage2:
            phase = f"stage2_{loss_kind}_{kind}"
            head = SecondStage(kind, decoder.classifier, args.crt_reinit).to(device)
            heads[(loss_kind, kind)] = head
            done = phases.finished(phase, chunks)
            if done:
                head.load_state_dict(done["modules"]["model"])
                continue
            feats = train_feats[:, m * width:(m + 1) * width]
            grw = class_weights(prior, "grw")
            head_loss = (lambda idx, h=head, f=feats: F.cross_entropy(h(f[idx]), labels_device[idx])) \
                if kind in ("crt", "lws") else (lambda idx, h=head, f=feats: reweighted(h(f[idx]), labels_device[idx],
                                                                                           grw))
            draw = balanced_batches if kind in ("crt", "lws") else instance_batches
            head_val = (lambda h=head, m=m: frame.accuracy(h, val_feats[:, m * width:(m + 1) * width], val_labels)) \
                if val else None
            phases.run(phase, {"model": head}, sgd(head), chunks, lambda c, draw=draw: [b.to(device) for b in draw(c)],
                       head_loss, schedule, validate=head_val, clip_grad=args.clip_grad)
            head.eval()

    # ---- evaluation: one pass of the tower and every decoder over the test images ----
    feats = encode(towers, test, "eval")
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
    stage1 = frame.trainable(next(iter(decoders.values())))
    stage2 = max((frame.trainable(h) for h in heads.values()), default=0)
    training = dict(optimizer_steps=f"{total_steps} + {total_steps}" if args.stage2 else total_steps, lr=base_lr,
                    trainable_params=f"{stage1} + {stage2}" if args.stage2 else stage1, selection=args.select,
                    batch_size=batch)
    results = frame.write_results(out, "Imbalance-VLM", preds, truth, counts, args.shot_rule, meta, titles, training)
    phases.done()  # the results are written: an interrupted run's last.pt goes
    print(f"Imbalance-VLM on {args.dataset} {split}: " + ", ".join(
        f"{name} {r['overall']:.2f}" for name, r in results["variants"].items()) + f" -> {out}")


if __name__ == "__main__":
    common.run_script(main)
