"""LT-DPT (long-tailed decoupling prompt tuning), on the kit's CLIP with VPT-deep prompts and a cosine classifier.

Foreground prompts in every layer attend to the patch tokens with a saliency bias, softmax(Q_P K^T / sqrt(D) +
alpha S) V, where S is the spectral-residual saliency of the image (Hou and Zhang 2007) average-pooled to the patch
grid and min-max normalised, and alpha is learnable (paper Eq. 3). Background prompts in the last H = 6 layers come
from G groups with a key each: a group scores the mean cosine between the layer's patch tokens and its key, and the
top-k groups are mixed by the softmax of their scores (Eq. 4); their attention is biased by beta (1 - S) (Eq. 5). The
loss is GCL (Li et al. 2022: the cosine logits minus |noise| times a margin growing with log n_max - log n_c, scale
25) with deferred re-weighting by effective numbers (beta 0.9998) in the last epochs, plus 0.5 x the pairwise cosine
of the prompt groups (Eqs. 6-7). GNM (Li et al. 2024) perturbs the trained weights with clamped Gaussian noise before
each forward and backward pass and steps from the unperturbed weights.

Reads   the train and evaluation splits, text_features.pt (stage 02: the class prompts initialise the classifier).
Writes  $(RUN)/systems/lt_dpt/: results.json (variant lt_dpt), results.md, predictions.npz, log.jsonl, lt_dpt.pt,
        last.pt (--resume).

    python -m systems.lt_dpt --dataset places_lt --data-root data/places_lt \
        --features runs/places_lt/text_features.pt --out runs/places_lt/systems/lt_dpt

Where the kit departs from the original (no public code; the paper and its bases LPT and GNM-PT):
- The backbone is CLIP's visual tower, not an ImageNet-21k ViT-B/16, and the cosine classifier starts from the class
  prompts of stage 02 (HLC's choice), not at random.
- The design gap: in deep VPT each layer's prompt outputs are thrown away, so a bias on the prompts' own attention
  rows would never reach CLS. Here the prompt tokens are carried forward: a layer's prompt input is the previous
  layer's prompt output plus that layer's learnable prompts (the background prompts join at layer L - H), so the
  biased attention of a layer shapes the tokens that CLS attends to in the layers after it. In the last layer there
  is no layer after it: alpha and beta act in layers 1 to L - 1 (a bias there could reach nothing, and would get no
  gradient).
- The bias enters open_clip's attention blocks through their attn_mask argument (an additive float mask per image
  and head), not through a modified block.
- Left open by the paper, set as LPT: prompt lengths 10 (foreground and background), 20 groups, top-2; alpha and beta
  one per layer, starting at 1. No code, so no val selection: the last weights are tested. The orthogonality term sums
  |cos| over the pairs of groups of a layer and averages over the H layers: Eq. 6 sums the cosines themselves, whose
  minimum is not orthogonality (a simplex, every pair at -1/(G-1)), while the text asks for groups "towards
  orthogonality", where |cos| is zero. GCL's noise multiplier 0.5 and no extra margin, as GCL's own first stage; GNM's
  rho 0.05, its noise halved once re-weighting starts (GNM-PT's code).

Published (ImageNet-21k ViT-B/16, many / medium / few / all): ImageNet-LT 85.8 / 84.1 / 78.4 / 84.0 (LT-DPT
Table 2); Places-LT 46.9 / 52.6 / 49.2 / 49.9 and iNaturalist 2018 62.7 / 77.7 / 79.5 / 76.9 (LT-DPT Table 3); not
comparable with CLIP on ImageNet-LT, whose pre-training overlaps ImageNet-21k. Toy world: docs/systems.md.
"""
import argparse
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
    # paper Sec. 5.3: SGD lr 0.005, batch 128; CIFAR-100-LT, ImageNet-LT, iNaturalist 70 epochs, DRW in the last 10
    "default": dict(epochs=70, drw_epochs=10, lr=0.005, batch_size=128, lr_scale=1.0),
    "places_lt": dict(epochs=100, drw_epochs=40),  # paper Sec. 5.3: Places-LT 100 epochs, DRW in the last 40
    # the toy world: the shared step budget (docs/systems.md), DRW in the last 1/7 as on ImageNet-LT; lr_scale picked
    # by make tune-toy
    "toy": dict(epochs=20, drw_epochs=3, batch_size=32, lr_scale=3.0),
}


# ---- saliency (Hou and Zhang 2007): spectral residual of the grey image, pooled to the patch grid ----

def spectral_residual_saliency(images, mean, std, grid, size=64, sigma=2.5):
    """Normalised images (B, 3, H, W) -> saliency (B, grid * grid) in [0, 1] per image."""
    rgb = images.float() * std + mean  # back to [0, 1]
    grey = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])[:, None]
    grey = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    spectrum = torch.fft.fft2(grey)
    log_amplitude, phase = torch.log(spectrum.abs() + 1e-8), torch.angle(spectrum)
    average = F.avg_pool2d(F.pad(log_amplitude[:, None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[:, 0]
    saliency = torch.fft.ifft2(torch.exp((log_amplitude - average) + 1j * phase)).abs() ** 2  # spectral residual
    radius = int(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=saliency.dtype, device=saliency.device)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    s = F.pad(saliency[:, None], (radius,) * 4, mode="reflect")
    s = F.conv2d(F.conv2d(s, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))  # separable Gaussian
    s = F.adaptive_avg_pool2d(s, grid).flatten(1)  # (B, grid * grid)
    low, high = s.min(1, keepdim=True).values, s.max(1, keepdim=True).values
    return (s - low) / (high - low).clamp(min=1e-12)


# ---- the prompts and the biased attention ----

def attention_bias(saliency, alpha, beta, n_fg, n_bg, heads):
    """The additive attention mask of one layer, (B * heads, T, T) over [CLS, foreground, background, patches]:
    foreground rows get alpha * S on the patch columns (Eq. 3), background rows beta * (1 - S) (Eq. 5), all else 0."""
    batch, patches = saliency.shape
    tokens = 1 + n_fg + n_bg + patches
    bias = saliency.new_zeros(batch, tokens, tokens)
    bias[:, 1:1 + n_fg, 1 + n_fg + n_bg:] = alpha * saliency[:, None, :]
    if n_bg:
        bias[:, 1 + n_fg:1 + n_fg + n_bg, 1 + n_fg + n_bg:] = beta * (1 - saliency[:, None, :])
    return bias.repeat_interleave(heads, dim=0)


def mix_groups(patches, keys, groups, top_k):
    """Eq. 4: each group's score is the mean cosine of the patch tokens (B, P, w) with its key (G, w); the top-k
    groups (G, n_b, w) are mixed by the softmax of their scores -> (B, n_b, w)."""
    score = (F.normalize(patches, dim=-1) @ F.normalize(keys, dim=-1).T).mean(1)  # (B, G)
    best, idx = score.topk(top_k, dim=1)
    return torch.einsum("bk,bkpw->bpw", torch.softmax(best, dim=1), groups[idx])


class DecoupledPrompts(nn.Module):
    """CLIP's frozen visual tower with foreground prompts in every layer and grouped background prompts in the last H
    layers, both carried forward from layer to layer (see the header)."""

    def __init__(self, visual, n_fg=10, n_bg=10, groups=20, top_k=2, bg_layers=6):
        super().__init__()
        self.visual = visual
        blocks = common.vit_blocks(visual, "LT-DPT's prompts")
        width, patch = visual.conv1.out_channels, visual.conv1.kernel_size[0]
        self.layers, self.bg_from = len(blocks), len(blocks) - min(bg_layers, len(blocks))
        self.heads = blocks[0].attn.num_heads
        self.grid = int(round((visual.positional_embedding.shape[0] - 1) ** 0.5))
        bound = math.sqrt(6.0 / (3 * patch * patch + width))  # VPT's init
        self.fg = nn.Parameter(torch.empty(self.layers, n_fg, width).uniform_(-bound, bound))
        n_layers_bg = self.layers - self.bg_from
        self.groups = nn.Parameter(torch.empty(n_layers_bg, groups, n_bg, width).uniform_(-bound, bound))
        self.keys = nn.Parameter(torch.empty(n_layers_bg, groups, width).uniform_(-bound, bound))
        # the last layer's prompt outputs are dropped before pooling, so a bias on their attention could reach
        # nothing there: alpha and beta act in every layer but the last
        self.alpha = nn.Parameter(torch.ones(self.layers - 1))
        self.beta = nn.Parameter(torch.ones(max(0, n_layers_bg - 1)))
        self.n_fg, self.n_bg, self.top_k = n_fg, n_bg, min(top_k, groups)

    def train(self, mode=True):
        super().train(mode)
        self.visual.eval()
        return self

    def forward(self, images, saliency):
        v, n_fg = self.visual, self.n_fg
        x = v._embeds(images)  # (B, 1 + P, width)
        cls, patches = x[:, :1], x[:, 1:]
        fg_out = bg_out = None
        for i, block in enumerate(v.transformer.resblocks):
            fg = self.fg[i].to(x.dtype).expand(len(x), -1, -1) + (fg_out if fg_out is not None else 0)
            parts = [cls, fg]
            if i >= self.bg_from:
                j = i - self.bg_from
                bg = mix_groups(patches, self.keys[j], self.groups[j], self.top_k).to(x.dtype)
                parts.append(bg + (bg_out if bg_out is not None else 0))
            n_bg = self.n_bg if i >= self.bg_from else 0
            bias = None if i == self.layers - 1 else attention_bias(
                saliency, self.alpha[i], self.beta[i - self.bg_from] if n_bg else 0.0, n_fg, n_bg, self.heads)
            y = block(torch.cat(parts + [patches], dim=1), attn_mask=bias)
            cls, fg_out, patches = y[:, :1], y[:, 1:1 + n_fg], y[:, 1 + n_fg + n_bg:]
            bg_out = y[:, 1 + n_fg:1 + n_fg + n_bg] if n_bg else None
        pooled, _ = v._pool(torch.cat([cls, patches], dim=1))
        return pooled @ v.proj if v.proj is not None else pooled

    def orthogonality(self):
        """Eq. 6, towards orthogonal groups: the sum over pairs of groups of |cos| (flattened prompts), averaged over
        the layers."""
        g = F.normalize(self.groups.flatten(2), dim=-1)  # (H, G, n_b * w)
        sim = g @ g.transpose(1, 2)
        off = ~torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
        return sim[:, off].abs().sum(-1).mean()


# ---- the loss: GCL with deferred re-weighting ----

def gcl_margins(counts):
    """log n_max - log n_c (a class with no image counts as one)."""
    log_n = torch.log(torch.as_tensor(counts, dtype=torch.float32).clamp(min=1))
    return log_n.max() - log_n


def gcl_loss(cosine, y, margins, scale=25.0, noise_mul=0.5, noise=None, weight=None, generator=None):
    """GCL: every cosine logit lowered by noise_mul * |noise| * margin_c / max(margin), noise ~ N(0, 1/3) clamped to
    [-1, 1] (the larger a class, the less it is lowered), then cross-entropy of scale x cosine."""
    if noise is None:
        noise = (torch.randn(cosine.shape, generator=generator) / 3).clamp(-1, 1).to(cosine.device)
    shift = noise_mul * noise.abs() * margins / margins.max().clamp(min=1e-12)
    return F.cross_entropy(scale * (cosine - shift), y, weight=weight)


def effective_number_weights(counts, beta=0.9998):
    """Cui et al. 2019: (1 - beta) / (1 - beta^n_c), normalised to sum to C (DRW's weights)."""
    n = torch.as_tensor(counts, dtype=torch.float64).clamp(min=1)
    w = (1 - beta) / (1 - beta ** n)
    return (w / w.sum() * len(w)).float()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    frame.add_io_args(p, "class prompts", "paper: ImageNet-21k ViT-B/16")
    p.add_argument("--epochs", type=int, help=common.recipe_help(RECIPES, "epochs", "epochs"))
    p.add_argument("--drw-epochs", type=int, help=common.recipe_help(RECIPES, "drw_epochs", "re-weighted final epochs"))
    p.add_argument("--lr", type=float, help=common.recipe_help(RECIPES, "lr", "SGD learning rate, cosine to 0"))
    p.add_argument("--batch-size", type=int, help=common.recipe_help(RECIPES, "batch_size", "images per step"))
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (paper: 0.9)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="SGD weight decay (paper: 0.01)")
    p.add_argument("--fg-tokens", type=int, default=10, help="foreground prompts per layer (paper: open; LPT: 10)")
    p.add_argument("--bg-tokens", type=int, default=10, help="prompts per background group (paper: open; LPT: 10)")
    p.add_argument("--groups", type=int, default=20, help="background groups G (paper: open; LPT: 20)")
    p.add_argument("--top-k", type=int, default=2, help="groups mixed per image (paper: open; LPT: 2)")
    p.add_argument("--bg-layers", type=int, default=6, help="last layers with background prompts H (paper: 6)")
    p.add_argument("--ortho-weight", type=float, default=0.5, help="lambda of the orthogonality term (paper: 0.5)")
    p.add_argument("--scale", type=float, default=25.0, help="scale of the cosine logits in GCL (kit: 25, HLC's)")
    p.add_argument("--noise-mul", type=float, default=0.5, help="GCL noise multiplier (GCL's first stage: 0.5)")
    p.add_argument("--drw-beta", type=float, default=0.9998, help="effective-number beta of DRW (paper: 0.9998)")
    p.add_argument("--gnm", action=argparse.BooleanOptionalAction, default=True,
                   help="GNM: step from weights perturbed by clamped Gaussian noise (paper: on)")
    p.add_argument("--gnm-rho", type=float, default=0.05, help="GNM noise scale rho (GNM-PT: 0.05)")
    frame.add_run_args(p, common.DECODE_MODES, selection="last")
    args = p.parse_args(argv)

    # ---- setup ----
    device, out = frame.setup(args, "lt_dpt", RECIPES)
    base_lr = args.lr * args.lr_scale
    drw_epochs = min(args.drw_epochs, args.epochs)

    # ---- data ----
    classnames, text, samples, counts, _, split, test = frame.load_data(args)
    margins = gcl_margins(counts).to(device)
    drw_weights = effective_number_weights(counts, args.drw_beta).to(device)
    batch = common.cap_batch(args.batch_size, len(samples))

    # ---- model: decoupled prompts around the frozen tower, a cosine classifier from the class prompts ----
    clip, preprocess_train, preprocess_val, model_name = common.load_clip(args.model, args.pretrained, device)
    common.drop_text_tower(clip)
    model = DecoupledPrompts(clip.visual, args.fg_tokens, args.bg_tokens, args.groups, args.top_k,
                             args.bg_layers).to(device)
    model.w_cls = nn.Parameter(text["classname"].float().clone().to(device))  # (C, d)
    normalize = next(t for t in preprocess_val.transforms if type(t).__name__ == "Normalize")
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (normalize.mean, normalize.std))
    params = [q for q in model.parameters() if q.requires_grad]
    meta = frame.make_meta("systems.lt_dpt", args, classnames, samples, text, model_name, split, test)
    phases = frame.Phases(out, meta, args, args.resume, common.parser_defaults(p, args))
    print(f"LT-DPT on {args.dataset}: frozen tower {common.count_parameters(clip.visual)[0] / 1e6:.2f}M; trained "
          f"{sum(q.numel() for q in params) / 1e6:.3f}M (prompts, keys, alpha, beta, classifier); "
          f"{args.epochs} epochs, re-weighted in the last {drw_epochs}; GNM {'on' if args.gnm else 'off'}")

    def cosine_logits(images):
        with common.image_autocast(device):
            f = model(images, spectral_residual_saliency(images, mean, std, model.grid))
        return F.normalize(f.float(), dim=-1) @ F.normalize(model.w_cls, dim=-1).T  # (B, C)

    # ---- loop: GCL (+ DRW at the end) + orthogonality, SGD, GNM: the gradient is taken at perturbed weights ----
    sampler = common.Batches()
    loader, to_device = common.image_loader(samples, preprocess_train, args.decode, device, seed=args.seed,
                                            workers=args.workers, batch_sampler=sampler)
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    modules = {"model": nn.ModuleDict({"prompts": nn.ParameterList([model.fg, model.groups, model.keys, model.alpha,
                                                                     model.beta, model.w_cls])})}
    state = {}

    def epoch_batches(epoch):
        state["reweight"] = epoch >= args.epochs - drw_epochs  # deferred re-weighting
        state["gen"] = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        perm = torch.randperm(len(samples), generator=state["gen"])
        sampler.batches = [[(epoch, j) for j in perm[i:i + batch].tolist()]
                           for i in range(0, len(perm) - batch + 1, batch)]
        return loader

    def gnm_loss(images_labels):
        images, y = to_device(images_labels)
        if args.gnm:  # w + e, e = rho * clamp(N(0, 1/3), -1, 1), halved once DRW starts
            state["saved"] = [q.detach().clone() for q in params]
            with torch.no_grad():
                for q in params:
                    q.add_(args.gnm_rho * 0.5 ** state["reweight"] *
                           (torch.randn(q.shape, generator=state["gen"]) / 3).clamp(-1, 1).to(q))
        return gcl_loss(cosine_logits(images), y, margins, args.scale, args.noise_mul, generator=state["gen"],
                        weight=drw_weights if state["reweight"] else None) + args.ortho_weight * model.orthogonality()

    def restore():  # GNM steps from the unperturbed weights with the perturbed point's gradient
        with torch.no_grad():
            for q, w in zip(params, state.get("saved", [])):
                q.copy_(w)

    done = phases.finished("lt_dpt", args.epochs)
    if done:
        modules["model"].load_state_dict(done["modules"]["model"])
    else:
        model.train()
        phases.run("lt_dpt", modules, optimizer, args.epochs, epoch_batches, gnm_loss,
                   lambda step, total: common.lr_at(step, total, 0, base_lr),
                   after_backward=restore if args.gnm else None)

    # ---- evaluation ----
    model.eval()

    class Classify(nn.Module):  # images -> cosine logits, for common.encode_split's one pass over the test set
        def forward(self, images):
            return cosine_logits(images)

    with torch.no_grad():
        logits = common.encode_split({"logits": Classify()}, test, preprocess_val, device, workers=args.workers,
                                     desc="eval", normalize=False, decode=args.decode)["logits"]
    truth = np.array([y for _, y, _ in test])
    training = dict(optimizer_steps=phases.steps["lt_dpt"], lr=base_lr, trainable_params=sum(q.numel() for q in params),
                    selection=args.select, batch_size=batch)
    results = frame.write_results(out, "LT-DPT", {"lt_dpt": logits.argmax(1).numpy()}, truth, counts, args.shot_rule,
                                  meta, titles={"lt_dpt": "decoupled prompts, GCL + DRW"}, training=training)
    r = results["variants"]["lt_dpt"]
    phases.done()  # the results are written: an interrupted run's last.pt goes
    print(f"LT-DPT on {args.dataset} {split}: {r['overall']:.2f} ({common.groups_line(r)}) -> {out}")


if __name__ == "__main__":
    common.run_script(main)
