"""VL-LTR (Tian et al., ECCV 2022, "Learning class-wise visual-linguistic representation for long-tailed visual
recognition"), the kit's lite version: the text tower stays frozen and its sentence features come from stage 02.

Stage 1, class-wise visual-linguistic pre-training (CVLP): every image of a batch meets one random corpus sentence
of its class; the B x B similarities exp(s) cos(image, sentence) (s learnable) are trained with L_ccl, cross-entropy
in both directions with the target spread over the same-class items of the batch (label smoothing 0.1), plus L_dis,
cross-entropy towards frozen CLIP's similarities on the same pairs: L = 0.5 L_ccl + 0.5 L_dis. Images are drawn
with probability proportional to 1 / sqrt(n_c) and augmented as DeiT does. Then anchor sentence selection (AnSS)
scores each sentence of a class by its L_lin against the val images (iNaturalist: at most 50 training images per
class) and keeps the 64 best; and the language-guided recognition head (LGR) is trained on the stage-1 tower's raw
features of images mixed as main.py mixes them (mixup 0.8, cutmix 1.0, label smoothing 0.1, soft-target
cross-entropy): G_c = softmax(Q K_c^T / sqrt(D)) V_c over class c's raw anchor features (Q = W_q LN(f),
K = W_k LN(anchors), V = anchors, W_q and W_k initialised to identity, one head), image branch MLP(f) and language
branch exp(s) cos(f, G_c) with stage 1's learned scale. Only the image branch's MLP (and, on iNaturalist, the tower)
trains at the LGR lr: the attention sits in the code's text group at 1e-6 (optim_factory.py), so it stays near
identity. Inference weighs the two softmaxes alpha : 1 - alpha (engine.py evaluate_LT: alpha 0.7 on iNaturalist,
0.2 elsewhere; output[0] is the MLP branch).

Reads   the train and evaluation splits, text_features.pt (stage 02: the corpus sentence features, their norms and
        labels, i.e. the 80 templates and the Wikipedia sentences of stage 01, VL-LTR's text), the CLIP model.
Writes  $(RUN)/systems/vl_ltr/: results.json (variants vl_ltr_lgr, the full system; vl_ltr_linear, its image branch
        alone; vl_ltr_text, its language branch alone), results.md, predictions.npz, log.jsonl, cvlp.pt and lgr.pt
        (each stage when done, with the anchors), last.pt (the stage in progress; --resume).

    python -m systems.vl_ltr --dataset places_lt --data-root data/places_lt \
        --features runs/places_lt/text_features.pt --out runs/places_lt/systems/vl_ltr

The recipes follow the original code (ChangyaoTian/VL-LTR: configs/*/pretrain/*_vit16.py for CVLP, configs/*/finetune/
*_vit16.py for LGR, main.py's defaults where a config is silent, optim_factory.py), which tests the last weights: AdamW,
weight decay 0.05 but none on biases and 1-D parameters; the MLP's trunc-normal(0.02) init; CVLP's cosine to the
config's min_lr (0 on ImageNet-LT and Places-LT, main.py's 1e-5 on iNaturalist); on iNaturalist LGR fine-tunes the
tower at 2e-5 with |G| detached (LGR_vit16_v_detach_img_grad). Where the kit departs:
- The text tower is frozen (stage 02's cached sentence features), where the original fine-tunes both towers on 8
  GPUs; the visual side trains VPT-deep prompts (20 x 12, HLC's, at HLC's lr 5e-4) by default, the whole visual tower
  with --finetune full (at the code's CVLP lr: 3.5e-5 ImageNet-LT, 1e-5 Places-LT, 3.5e-4 iNaturalist).
- One process: every optimizer step sums the gradients of --accum-steps 8 batches of 128, the original's 8 GPUs x
  128 = 1,024 images a step (no lr scaling, as the code), but CVLP's contrastive batch is each batch of 128, where the
  original gathers 1,024 across its GPUs (fewer negatives per image). The toy world takes 1 (its shared budget).
- The sentences are the kit's corpus, balanced to --per-class sentences per class by stage 01; AnSS ranks each class's
  distinct sentences, on normalised features (cosines, as the paper's L_lin).
- Augmentation is torchvision's RandAugment (2 ops, magnitude 9) for timm's rand-m9-mstd0.5-inc1 (no magnitude noise),
  with the code's crop 0.08-1, flips and random erasing 0.25.
- cos(f, G_c) is computed without forming G (B x C x D): f.G_c is the attention-weighted sum of f.anchor, and |G_c|^2
  uses the anchors' Gram matrix (exact, and small for 8,142 classes).
- The logit scale s starts at CLIP's own (the code sets log(1/0.07), then loading CLIP's weights replaces it).
- --lr-scale (make tune-toy) multiplies every lr of the recipe, LGR's text group's too.

Published (ViT-B/16, HLC Tables 1-3): ImageNet-LT 84.5 / 74.6 / 59.3 / 77.2; Places-LT 54.2 / 48.5 / 42.0 / 50.1;
iNaturalist 2018 81.6 / 78.0 / 74.4 / 76.8 (81.0 overall at 384 px). Toy world: docs/systems.md.
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
    # code: configs/imagelt/pretrain/pretrain_vit16.py (CVLP) and configs/imagelt/finetune/finetune_vit16.py (LGR), 8
    # GPUs of 128 images; main.py's defaults where a config is silent. lr: the prompts' (HLC's 5e-4); lr_full: the
    # code's CVLP lr for --finetune full; alpha: engine.py evaluate_LT; accum_steps: 8 x 128 = 1,024 images a step, as
    # the 8 GPUs average them (the code scales no lr); anss_split: the config's test=True scores the anchors on val;
    # lgr_tower: LGR_vit16 freezes the tower (img_grad=False); min_lr_cvlp: the config's min_lr
    "default": dict(epochs_cvlp=50, epochs_lgr=50, lr=5e-4, lr_full=3.5e-5, lr_lgr=1e-3, batch_size=128, alpha=0.2,
                    prompt_tokens=20, lr_scale=1.0, accum_steps=8, anss_split="val", lgr_tower="frozen",
                    min_lr_cvlp=0.0),
    "places_lt": dict(lr_full=1e-5, lr_lgr=5e-5),  # configs/placeslt/{pretrain,finetune}/places_*_vit16.py
    # configs/inat/...: LGR_vit16_v_detach_img_grad fine-tunes the tower in LGR; no test=True, so the anchors are scored
    # on training images; the CVLP config sets no min_lr (main.py: 1e-5)
    "inat2018": dict(epochs_cvlp=100, epochs_lgr=360, lr_full=3.5e-4, lr_lgr=2e-5, alpha=0.7, anss_split="train",
                     lgr_tower="finetune", min_lr_cvlp=1e-5),
    # the toy world: the shared step budget (docs/systems.md) at batch 32, split evenly between the stages as the
    # code's 50 + 50 epochs; lr_scale picked by make tune-toy
    "toy": dict(epochs_cvlp=10, epochs_lgr=10, batch_size=32, prompt_tokens=2, lr_scale=1000.0, accum_steps=1),
}


# ---- stage 1: the losses ----

def smooth_soft_ce(logits, target, smoothing=0.1):
    """The code's smoothCE: (1 - e) x cross-entropy to the soft target + e x the mean negative log-probability."""
    log_p = F.log_softmax(logits, dim=-1)
    return ((1 - smoothing) * -(target * log_p).sum(-1) + smoothing * -log_p.mean(-1)).mean()


def ccl_loss(image, text, labels, scale, smoothing=0.1):
    """L_ccl over the batch: image i against sentence j, the target spread over the same-class pairs, both ways."""
    logits = scale * image @ text.T  # (B, B), features normalised
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)  # symmetric, so one target serves both directions
    return 0.5 * (smooth_soft_ce(logits, target, smoothing) + smooth_soft_ce(logits.T, target, smoothing))


def distill_loss(student, teacher):
    """L_dis: cross-entropy from frozen CLIP's similarities to the student's, on the same pairs, both ways."""
    ce = lambda s, t: -(F.softmax(t, -1) * F.log_softmax(s, -1)).sum(-1).mean()
    return 0.5 * (ce(student, teacher) + ce(student.T, teacher.T))


# ---- anchor sentence selection and the LGR head ----

def anss_scores(sentences, sentence_labels, images, image_labels, scale):
    """L_lin of each sentence against the image set: -mean over the images of its class of
    log softmax over all images of scale x cos(sentence, image). Lower picks out its class better."""
    scores = []
    for lo in range(0, len(sentences), 1024):
        logits = scale * sentences[lo:lo + 1024] @ images.T  # (S, I)
        target = (sentence_labels[lo:lo + 1024, None] == image_labels[None, :]).float()
        scores.append(-(target / target.sum(1, keepdim=True).clamp(min=1) * F.log_softmax(logits, -1)).sum(-1))
    return torch.cat(scores)


def select_anchors(corpus, corpus_labels, images, image_labels, scale, num_classes, keep, rank_by=None):
    """(C, keep, d) anchors and their (C, keep) mask: each class's distinct sentences with the lowest L_lin. The
    sentences are ranked by their features in `rank_by` (default: `corpus` itself; normalised, as L_lin is a cosine)
    and returned as they are in `corpus` (the LGR head takes them raw)."""
    rank_by = corpus if rank_by is None else rank_by
    d = corpus.shape[1]
    anchors, mask = torch.zeros(num_classes, keep, d), torch.zeros(num_classes, keep, dtype=torch.bool)
    for c in range(num_classes):
        rows = torch.nonzero(corpus_labels == c).flatten()
        _, first = np.unique(rank_by[rows].cpu().numpy(), axis=0, return_index=True)  # the corpus repeats sentences
        rows = rows[torch.as_tensor(np.sort(first), device=rows.device)]
        if len(rows) == 0:
            continue
        # scored where the images are (a GPU), the class's labels made there too
        score = anss_scores(rank_by[rows].to(images.device), torch.full((len(rows),), c, device=images.device),
                            images, image_labels, scale)
        best = rows[score.cpu().argsort()[:keep].to(rows.device)]
        anchors[c, :len(best)], mask[c, :len(best)] = corpus[best].cpu(), True
    return anchors, mask


class LGR(nn.Module):
    """Language-guided recognition: (image-branch logits MLP(f), language-branch logits scale x cos(f, G)) on raw
    image features f and raw anchor features. The MLP starts as the code's _init_weights (trunc-normal 0.02, zero
    bias), W_q and W_k as identities. v_detach (LGR_vit16_v_detach_img_grad): |G_c| is taken as a constant in the
    backward pass."""

    def __init__(self, anchors, mask, num_classes, scale, v_detach=False):
        super().__init__()
        d = anchors.shape[-1]
        self.norm_q, self.norm_k = nn.LayerNorm(d), nn.LayerNorm(d)
        self.w_q, self.w_k = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, num_classes))
        with torch.no_grad():
            self.w_q.weight.copy_(torch.eye(d))
            self.w_k.weight.copy_(torch.eye(d))
            for layer in (self.mlp[0], self.mlp[2]):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                layer.bias.zero_()
        self.register_buffer("anchors", anchors)  # (C, M, d), V
        self.register_buffer("mask", mask)
        self.register_buffer("gram", anchors @ anchors.transpose(1, 2))  # (C, M, M)
        self.scale, self.v_detach = scale, v_detach  # stage 1's learned exp(s), fixed (the code loads it frozen)

    def attention_parameters(self):
        """W_q, W_k and their LayerNorms: the optimizer's text group in the code (their names hold no 'visual')."""
        return [q for m in (self.norm_q, self.norm_k, self.w_q, self.w_k) for q in m.parameters()]

    def forward(self, f):
        q = self.w_q(self.norm_q(f))  # (B, d)
        k = self.w_k(self.norm_k(self.anchors))  # (C, M, d)
        att = torch.einsum("bd,cmd->bcm", q, k) / math.sqrt(f.shape[-1])
        att = torch.softmax(att.masked_fill(~self.mask, float("-inf")), dim=-1).nan_to_num(0.0)  # (B, C, M)
        f_dot_g = torch.einsum("bcm,bcm->bc", att, torch.einsum("bd,cmd->bcm", f, self.anchors))
        g_norm = torch.einsum("bcm,cmn,bcn->bc", att, self.gram, att).clamp(min=1e-12).sqrt()  # |G_c|
        if self.v_detach:
            g_norm = g_norm.detach()
        text_logits = self.scale * f_dot_g / (f.norm(dim=-1, keepdim=True) * g_norm)  # exp(s) cos(f, G_c)
        return self.mlp(f), text_logits


def mix_images(images, labels, num_classes, gen, mixup=0.8, cutmix=1.0, smoothing=0.1, switch=0.5):
    """main.py's Mixup in batch mode (timm's, in the code's mixup.py): one lambda per batch, cutmix (a box pasted from
    the reversed batch, lambda corrected to the box's area) with probability `switch` when both are on, else mixup;
    targets smoothed (on 1 - e + e / C, off e / C) and mixed with the reversed batch's by the same lambda."""
    off = smoothing / num_classes
    target = torch.full((len(labels), num_classes), off, device=images.device)
    target.scatter_(1, labels[:, None], 1 - smoothing + off)
    use_cutmix = cutmix > 0 and (mixup <= 0 or float(torch.rand(1, generator=gen)) < switch)
    alpha = cutmix if use_cutmix else mixup
    if alpha <= 0:
        return images, target
    lam = float(np.random.default_rng(int(torch.randint(1 << 31, (1,), generator=gen))).beta(alpha, alpha))
    flipped = images.flip(0)
    if use_cutmix:
        h, w = images.shape[-2:]
        ratio = math.sqrt(1 - lam)
        cut_h, cut_w = int(h * ratio), int(w * ratio)
        cy, cx = int(torch.randint(h, (1,), generator=gen)), int(torch.randint(w, (1,), generator=gen))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        images = lam * images + (1 - lam) * flipped
    return images, lam * target + (1 - lam) * target.flip(0)


def fuse(image_logits, text_logits, alpha):
    """The code's inference (engine.py evaluate_LT): alpha softmax(image branch) + (1 - alpha) softmax(language)."""
    return alpha * F.softmax(image_logits, -1) + (1 - alpha) * F.softmax(text_logits, -1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    frame.add_io_args(p, "corpus sentence features")
    p.add_argument("--finetune", choices=["prompts", "full"], default="prompts",
                   help="stage 1 trains VPT-deep prompts (kit) or the whole visual tower (the original trains both "
                        "towers)")
    p.add_argument("--prompt-tokens", type=int, help=common.recipe_help(RECIPES, "prompt_tokens", "VPT tokens per "
                                                                         "layer (HLC's)"))
    p.add_argument("--prompt-depth", type=int, default=12, help="layers with prompts (HLC's 12)")
    p.add_argument("--epochs", type=int, help="set both stages to this many epochs (Make: EPOCHS)")
    p.add_argument("--epochs-cvlp", type=int, help=common.recipe_help(RECIPES, "epochs_cvlp", "stage 1 epochs"))
    p.add_argument("--epochs-lgr", type=int, help=common.recipe_help(RECIPES, "epochs_lgr", "LGR epochs"))
    p.add_argument("--lr", type=float, help=common.recipe_help(RECIPES, "lr", "stage 1 AdamW lr of the prompts"))
    p.add_argument("--lr-full", type=float, help=common.recipe_help(RECIPES, "lr_full", "stage 1 AdamW lr of the "
                                                                                         "whole tower"))
    p.add_argument("--lr-lgr", type=float, help=common.recipe_help(RECIPES, "lr_lgr", "LGR AdamW lr"))
    p.add_argument("--batch-size", type=int, help=common.recipe_help(RECIPES, "batch_size", "images per step"))
    p.add_argument("--alpha", type=float, help=common.recipe_help(RECIPES, "alpha", "weight of the image branch's "
                                                                                     "softmax at inference"))
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay, none on biases and 1-D "
                                                                     "parameters (code: 0.05)")
    p.add_argument("--warmup-epochs", type=float, default=5, help="stage 1 linear warm-up epochs, at most a tenth of "
                                                                   "the epochs (code: 5 of 50; LGR: 0)")
    p.add_argument("--distill-weight", type=float, default=0.5, help="L = (1 - w) L_ccl + w L_dis (code: 0.5)")
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing of L_ccl and of LGR's mixed targets "
                                                                 "(code: 0.1)")
    p.add_argument("--anchors", type=int, default=64, help="anchor sentences kept per class (code: 64)")
    p.add_argument("--anss-split", choices=["val", "train"], help=common.recipe_help(
        RECIPES, "anss_split", "AnSS scores the sentences on the val split, or on at most --anss-images training "
                               "images per class"))
    p.add_argument("--anss-images", type=int, default=50, help="with --anss-split train: images per class (paper: 50)")
    p.add_argument("--randaugment", type=int, default=9, help="RandAugment magnitude, 0 = none (code: 9)")
    p.add_argument("--erasing", type=float, default=0.25, help="random erasing probability (code: 0.25)")
    p.add_argument("--accum-steps", type=int, help=common.recipe_help(
        RECIPES, "accum_steps", "batches whose gradients make one optimizer step (the code: 8 GPUs x 128)"))
    p.add_argument("--min-lr-cvlp", type=float, help=common.recipe_help(RECIPES, "min_lr_cvlp", "stage 1's cosine "
                                                                                                  "ends at this lr"))
    p.add_argument("--text-lr", type=float, default=1e-6, help="LGR: lr of W_q, W_k and their LayerNorms, the code's "
                                                                "text group (code: 1e-6)")
    p.add_argument("--lgr-tower", choices=["frozen", "finetune"], help=common.recipe_help(
        RECIPES, "lgr_tower", "LGR keeps the stage-1 tower frozen, or fine-tunes it at the LGR lr with |G| detached "
                              "(LGR_vit16_v_detach_img_grad)"))
    p.add_argument("--mixup", type=float, default=0.8, help="LGR: mixup alpha (code: main.py's 0.8)")
    p.add_argument("--cutmix", type=float, default=1.0, help="LGR: cutmix alpha (code: main.py's 1.0)")
    frame.add_run_args(p, selection="last")
    args = p.parse_args(argv)

    # ---- setup ----
    device, out = frame.setup(args, "vl_ltr", RECIPES)
    epochs_cvlp, epochs_lgr = (args.epochs, args.epochs) if args.epochs else (args.epochs_cvlp, args.epochs_lgr)
    lr_scale = args.lr_scale  # one factor moves every lr of the recipe (make tune-toy), the text group's too
    lr = (args.lr if args.finetune == "prompts" else args.lr_full) * lr_scale
    lr_lgr = args.lr_lgr * lr_scale

    # ---- data: the images, and the corpus sentences (features from stage 02) ----
    classnames, text, samples, counts, val, split, test = frame.load_data(args)
    num_classes = len(classnames)
    corpus, corpus_labels = text["corpus"].float().to(device), text["corpus_labels"].to(device)
    raw_corpus = corpus * text["corpus_norm"].float().to(device)[:, None]  # the text tower's raw output
    labels = torch.tensor([y for _, y, _ in samples])
    sqrt_weights = 1.0 / np.sqrt(np.maximum(counts, 1))  # the code's square-root sampling
    batch = common.cap_batch(args.batch_size, len(samples))

    # ---- model: the visual side (prompts or the whole tower), frozen CLIP as the teacher ----
    clip, _, preprocess_val, model_name = common.load_clip(args.model, args.pretrained, device)
    common.drop_text_tower(clip)
    teacher = clip.visual if args.finetune == "prompts" else copy.deepcopy(clip.visual)  # frozen, no prompts
    student = common.PromptedVisual(clip.visual, args.prompt_tokens if args.finetune == "prompts" else 0,
                                    args.prompt_depth, "VL-LTR's prompts (--finetune full trains without)").to(device)
    if args.finetune == "full":
        student.visual.requires_grad_(True)
    logit_scale = nn.Parameter(torch.tensor(math.log(text["logit_scale"]), device=device))  # s, learnable
    trained = [q for q in student.parameters() if q.requires_grad] + [logit_scale]
    meta = frame.make_meta("systems.vl_ltr", args, classnames, samples, text, model_name, split, test)
    phases = frame.Phases(out, meta, args, args.resume, common.parser_defaults(p, args))
    order = torch.argsort(corpus_labels, stable=True)  # sentences by class, to draw one of an image's class
    per_class = torch.bincount(corpus_labels, minlength=num_classes)
    starts = torch.cumsum(per_class, 0) - per_class
    if len(samples) // batch < args.accum_steps:
        print(f"note: {len(samples)} training images give {len(samples) // batch} batches of {batch}, fewer than "
              f"--accum-steps {args.accum_steps}: one optimizer step per epoch of them")
        args.accum_steps = max(1, len(samples) // batch)
    steps_per_epoch = len(samples) // batch // args.accum_steps  # optimizer steps
    print(f"VL-LTR on {args.dataset}: visual side {args.finetune} ({sum(q.numel() for q in trained) / 1e6:.3f}M "
          f"trained), text tower frozen ({len(corpus)} cached sentences), teacher: frozen CLIP; alpha {args.alpha}")

    def adamw(groups):
        """The code's optimizer (optim_factory.py): AdamW, no weight decay on biases and 1-D parameters; each group
        {params, lr_scale} at the phase's lr times its lr_scale."""
        split = []
        for g in groups:
            for no_decay in (False, True):
                params = [q for q in g["params"] if q.requires_grad and (q.ndim <= 1) == no_decay]
                if params:
                    split.append(dict(params=params, lr_scale=g.get("lr_scale", 1.0),
                                      weight_decay=0.0 if no_decay else args.weight_decay))
        return torch.optim.AdamW(split, lr=1.0)

    def sqrt_batches(epoch):
        return frame.weighted_batches(labels, sqrt_weights, batch, len(samples),
                                      torch.Generator().manual_seed(args.seed * 1000 + epoch))

    sampler = common.Batches()
    transform = frame.train_transform(preprocess_val, randaugment=args.randaugment, erasing=args.erasing)
    loader, to_device = common.image_loader(samples, transform, args.decode, device, seed=args.seed,
                                            workers=args.workers, batch_sampler=sampler)

    def image_batches(epoch):  # square-root sampling, each epoch's draw seeded by it
        sampler.batches = [[(epoch, j) for j in b.tolist()] for b in sqrt_batches(epoch)]
        return loader

    # ---- stage 1: CVLP, images against sentences of their class, distilled from frozen CLIP ----
    stage1 = {"scale": nn.ParameterList([logit_scale]),  # with prompts, the tower itself need not be saved
              **({"prompts": nn.ParameterList([student.prompts])} if args.finetune == "prompts"
                 else {"tower": student})}
    done = phases.finished("cvlp", epochs_cvlp)
    if done:
        for name, module in stage1.items():
            module.load_state_dict(done["modules"][name])
    else:
        draw = {}  # the epoch's generator of sentence picks, seeded by the epoch so a resumed run repeats them

        def cvlp_batches(epoch):
            draw["gen"] = torch.Generator().manual_seed(args.seed * 1000 + 500 + epoch)
            return image_batches(epoch)

        def cvlp_loss(images_labels):
            images, y = to_device(images_labels)
            pick = (torch.rand(len(y), generator=draw["gen"]).to(device) * per_class[y]).long()
            sentences = corpus[order[starts[y] + pick]]  # one sentence of each image's class, (B, d)
            with common.image_autocast(device):
                image = student(images)
                with torch.no_grad():
                    image_teacher = teacher(images)
            image, image_teacher = F.normalize(image.float(), dim=-1), F.normalize(image_teacher.float(), dim=-1)
            logits = logit_scale.exp() * image @ sentences.T
            teacher_logits = text["logit_scale"] * image_teacher @ sentences.T
            return ((1 - args.distill_weight) * ccl_loss(image, sentences, y, logit_scale.exp(), args.smoothing)
                    + args.distill_weight * distill_loss(logits, teacher_logits))

        warmup = int(min(args.warmup_epochs, epochs_cvlp / 10) * steps_per_epoch)
        student.train()
        phases.run("cvlp", stage1, adamw([dict(params=trained)]), epochs_cvlp, cvlp_batches, cvlp_loss,
                   lambda step, total: args.min_lr_cvlp * lr_scale + common.lr_at(step, total, warmup,
                                                                                 lr - args.min_lr_cvlp * lr_scale),
                   accum=args.accum_steps)
    student.eval().requires_grad_(False)
    scale = float(logit_scale.detach().exp())  # CVLP's learnt scale, fixed from here on

    # ---- anchor sentences (AnSS), scored on the val split (iNaturalist: at most 50 training images per class) ----
    encode = lambda items, what: common.encode_split({"f": student}, items, preprocess_val, device,
                                                     workers=args.workers, desc=what, normalize=False)["f"]
    done = phases.finished("lgr", epochs_lgr)
    if done:
        anchors, mask = done["anchors"], done["anchor_mask"]
    else:
        if args.anss_split == "val" and common.split_file(args.data_root, args.dataset, "val") is not None \
                and "val" in common.dataset_info(args.dataset)["splits"]:
            scored = common.read_split(args.data_root, args.dataset, "val", num_classes)
        else:
            if args.anss_split == "val":
                print("note: no val split: AnSS scores the sentences on training images, as on iNaturalist")
            gen = torch.Generator().manual_seed(args.seed)
            picks = [torch.randperm(int(n), generator=gen)[:args.anss_images] for n in counts]
            scored = [samples[int(i)] for c, pick in enumerate(picks)
                      for i in torch.nonzero(labels == c).flatten()[pick]]
        scored_labels = torch.tensor([y for _, y, _ in scored]).to(device)
        scored_feats = F.normalize(encode(scored, "AnSS").to(device), dim=-1)
        anchors, mask = select_anchors(raw_corpus, corpus_labels, scored_feats, scored_labels, scale, num_classes,
                                       args.anchors, rank_by=corpus)
        print(f"AnSS: {int(mask.sum())} anchor sentences, {args.anchors} at most per class, scored on {len(scored)} "
              f"images")

    # ---- LGR: the head on the stage-1 tower (frozen; fine-tuned on iNaturalist), images mixed as main.py mixes them.
    #      Only the image branch's MLP (and a fine-tuned tower) trains at the LGR lr; the attention sits in the code's
    #      text group at --text-lr ----
    finetune_tower = args.lgr_tower == "finetune"
    head = LGR(anchors, mask, num_classes, scale, v_detach=finetune_tower).to(device)
    tower_params = [q for q in student.visual.parameters()] if finetune_tower else []
    if done:
        head.load_state_dict(done["modules"]["lgr"])
        if finetune_tower:
            student.visual.load_state_dict(done["modules"]["tower"])
    else:
        lgr_modules = {"lgr": head, **({"tower": student.visual} if finetune_tower else {})}
        mix = {}

        def lgr_batches(epoch):
            mix["gen"] = torch.Generator().manual_seed(args.seed * 1000 + 700 + epoch)
            return image_batches(1000 + epoch)

        def lgr_loss(images_labels):
            images, y = to_device(images_labels)
            images, target = mix_images(images, y, num_classes, mix["gen"], args.mixup, args.cutmix, args.smoothing)
            with common.image_autocast(device), torch.set_grad_enabled(finetune_tower):
                f = student(images)
            image_logits, text_logits = head(f.float())
            return common.soft_cross_entropy(image_logits, target) + common.soft_cross_entropy(text_logits, target)

        if finetune_tower:
            student.visual.requires_grad_(True)
            student.train()
        optimizer = adamw([dict(params=list(head.mlp.parameters()) + tower_params),
                           dict(params=head.attention_parameters(), lr_scale=args.text_lr / args.lr_lgr)])
        phases.run("lgr", lgr_modules, optimizer, epochs_lgr, lgr_batches, lgr_loss,
                   lambda step, total: common.lr_at(step, total, 0, lr_lgr), accum=args.accum_steps,
                   keep=dict(anchors=anchors.cpu(), anchor_mask=mask.cpu()))
        student.eval().requires_grad_(False)
    head.eval()

    # ---- evaluation: the two branches' probabilities, weighed alpha : 1 - alpha ----
    with torch.no_grad():
        f = encode(test, "eval").to(device)
        image_logits, text_logits = head(f)
        preds = {"vl_ltr_lgr": fuse(image_logits, text_logits, args.alpha).argmax(1).cpu().numpy(),
                 "vl_ltr_linear": image_logits.argmax(1).cpu().numpy(),
                 "vl_ltr_text": text_logits.argmax(1).cpu().numpy()}
    truth = np.array([y for _, y, _ in test])
    training = dict(optimizer_steps=sum(phases.steps.values()), lr=f"CVLP {lr:g}, LGR {lr_lgr:g}",
                    trainable_params=f"{sum(q.numel() for q in trained)} + {frame.trainable(head)}",
                    selection=args.select, batch_size=batch)
    results = frame.write_results(out, "VL-LTR", preds, truth, counts, args.shot_rule, meta, titles={
        "vl_ltr_lgr": "CVLP + LGR (both branches)", "vl_ltr_linear": "image branch alone",
        "vl_ltr_text": "language branch alone"}, training=training)
    phases.done()  # the results are written: an interrupted run's last.pt goes
    v = results["variants"]
    print(f"VL-LTR on {args.dataset} {split}: LGR {v['vl_ltr_lgr']['overall']:.2f} "
          f"({common.groups_line(v['vl_ltr_lgr'])}), image branch {v['vl_ltr_linear']['overall']:.2f} -> {out}")


if __name__ == "__main__":
    common.run_script(main)
