"""LIFT (Shi et al., ICML 2024, "Long-Tail Learning with Foundation Model: Heavy Fine-Tuning Hurts"), on the kit.
Not in the HLC paper's tables: the lightweight fine-tuning method CLIP long-tail papers now compare with.

CLIP's image tower stays frozen and a lightweight module is trained inside it: AdaptFormer by default (in every block
a bottleneck LN -> down -> ReLU -> up, scaled by a learnable factor, added in parallel with the MLP; its up-projection
starts at zero, so training starts from CLIP itself), VPT-deep, LoRA on the attention's query and value, or nothing
(the classifier alone). A cosine classifier (scale 25) starts from the class-prompt text features (LIFT's semantic-aware
initialisation) and is trained with the logit-adjusted loss, CE(z + log pi), by SGD for 10 epochs (iNaturalist 20) with
a cosine schedule. Test-time ensembling (TTE) averages the logits of five crops of the image enlarged by 24 px.

Reads   the train and evaluation splits, text_features.pt (stage 02: the class prompts initialise the classifier).
Writes  $(RUN)/systems/lift/: results.json (variants lift and lift_tte), results.md, predictions.npz, log.jsonl,
        lift.pt, last.pt (--resume).

    python -m systems.lift --dataset imagenet_lt --data-root /data/imagenet \
        --features runs/imagenet_lt/text_features.pt --out runs/imagenet_lt/systems/lift

The recipes follow the original code (shijxcs/LIFT: configs/model/clip_vit_b16.yaml, utils/config.py, trainer.py,
models/peft_vit.py, scripts/run_tab1to4_main_results.sh), which tests the last weights. Where the kit departs from it:
- The classifier works in CLIP's shared space (after the projection) and starts from stage 02's class-prompt features
  (the 80-template ensemble), like every method of the kit; LIFT's works on the 768-wide token before the projection,
  starting from "a photo of a {}." mapped back through the projection's transpose.
- Evaluation without TTE uses CLIP's evaluation transform (resize to the model's size, centre crop), as every method
  of the kit; LIFT resizes to 8/7 of it first. TTE follows LIFT: resize to size + 24 (scaled with the input size, so
  3 px on the toy world's 32 px), five crops, logits averaged.
- LIFT trains in fp16 autocast with a gradient scaler; the kit uses bf16 autocast on CUDA GPUs from Ampere on, float32
  below (no scaler needed).
- LIFT picks one tuner or combines them; here --tuner picks one.
As the code: AdaptFormer's bottleneck is 2^floor(log2(C / 2L)) wide (C classes, L blocks: 32 for ImageNet-LT with
ViT-B/16, 8 for Places-LT, 4 for CIFAR-100); weight decay 5e-4 on every trained parameter; the cosine schedule steps
once per epoch (CosineAnnealingLR with T_max = epochs); augmentation RandomResizedCrop(0.08-1, bilinear) and flips.

Published (CLIP ViT-B/16, overall, LIFT as listed by Papers with Code; whether with TTE is not checked here):
ImageNet-LT 78.3, Places-LT 52.2, CIFAR-100-LT 81.7 / 83.1 / 84.9 (imbalance ratio 100 / 50 / 10). Toy world:
docs/systems.md.
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
    # code: configs/model/clip_vit_b16.yaml (num_epochs 10, batch_size 128, lr 0.01), utils/config.py (scale 25),
    # scripts/run_tab1to4_main_results.sh (the same for ImageNet-LT, Places-LT and CIFAR-100-LT)
    "default": dict(epochs=10, lr=0.01, batch_size=128, lr_scale=1.0),
    "inat2018": dict(epochs=20),  # scripts/run_tab1to4_main_results.sh: num_epochs 20
    # the toy world: the shared step budget (docs/systems.md); lr_scale picked by make tune-toy
    "toy": dict(epochs=20, batch_size=32, lr_scale=3.0),
}
TUNERS = ("adaptformer", "vpt", "lora", "none")


class AdaptFormer(nn.Module):
    """LIFT's AdaptFormer module: scale * up(ReLU(down(LN(x)))), up-projection zero at the start (peft_modules.py)."""

    def __init__(self, width, dim):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.down, self.up = nn.Linear(width, dim), nn.Linear(dim, width)
        nn.init.kaiming_normal_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.up(F.relu(self.down(self.ln(x)))) * self.scale


class LoRA(nn.Module):
    """LIFT's LoRA: x A B / dim, B zero at the start."""

    def __init__(self, width, dim):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.empty(width, dim)), nn.Parameter(torch.zeros(dim, width))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.dim = dim

    def forward(self, x):
        return x @ self.a @ self.b / self.dim


def tuned_block(block, x, adapter=None, lora=None):
    """open_clip's ResidualAttentionBlock with LIFT's tuners: LoRA added to the query and value projections, and
    AdaptFormer reading the residual stream after attention, its output added beside the MLP's (peft_vit.py)."""
    h = block.ln_1(x)
    if lora is None:
        a = block.attention(h)
    else:
        attn = block.attn
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, v = q + lora["q"](h), v + lora["v"](h)
        b, t, w = q.shape
        q, k, v = (z.view(b, t, attn.num_heads, w // attn.num_heads).transpose(1, 2) for z in (q, k, v))
        a = attn.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, w))
    x = x + block.ls_1(a)
    out = x + block.ls_2(block.mlp(block.ln_2(x)))
    return out + adapter(x) if adapter is not None else out


def adapter_width(num_classes, layers):
    """LIFT's bottleneck rule (peft_vit.py): 2^floor(log2(C / 2L)), at least 1."""
    return 2 ** max(0, int(math.log2(num_classes / (layers * 2))))


class Lift(nn.Module):
    """The frozen visual tower with one of LIFT's tuners, and the cosine classifier (initialised from text features)."""

    def __init__(self, visual, tuner, dim, vpt_len, classname_feats, scale):
        super().__init__()
        self.visual, self.tuner, self.scale = visual, tuner, scale
        blocks = common.vit_blocks(visual, f"LIFT's {tuner} tuner")
        width = visual.conv1.out_channels
        self.adapters = nn.ModuleList(AdaptFormer(width, dim) for _ in blocks) if tuner == "adaptformer" else None
        self.loras = nn.ModuleList(nn.ModuleDict({"q": LoRA(width, dim), "v": LoRA(width, dim)}) for _ in blocks) \
            if tuner == "lora" else None
        self.vpt = common.PromptedVisual(visual, vpt_len, len(blocks)) if tuner == "vpt" else None
        self.head = nn.Parameter(classname_feats.clone())  # (C, d): semantic-aware initialisation

    def train(self, mode=True):
        super().train(mode)
        self.visual.eval()  # frozen backbone stays in eval mode
        return self

    def features(self, images):
        if self.vpt is not None:
            return self.vpt(images)
        v = self.visual
        x = v._embeds(images)
        for i, block in enumerate(v.transformer.resblocks):
            x = tuned_block(block, x, self.adapters[i] if self.adapters is not None else None,
                            self.loras[i] if self.loras is not None else None)
        pooled, _ = v._pool(x)
        return pooled @ v.proj if v.proj is not None else pooled

    def forward(self, images):
        return self.scale * F.normalize(self.features(images).float(), dim=-1) @ F.normalize(self.head, dim=-1).T

    def trained(self):
        return [q for name, q in self.named_parameters() if not name.startswith("visual.") and q.requires_grad]


def logit_adjusted_loss(logits, y, log_prior, tau=1.0):
    """Menon et al. 2021 (LIFT's LogitAdjustedLoss): cross-entropy of z + tau log(pi)."""
    return F.cross_entropy(logits + tau * log_prior, y)


class FiveCropPick:
    """The k-th of torchvision's five crops (four corners, centre) of an image resized to size + expand: LIFT's TTE,
    one crop per pass (a class, not a lambda, so loader workers can take it under any start method)."""

    def __init__(self, size, expand, k, normalize):
        from torchvision import transforms as T
        self.resize, self.size, self.k = T.Resize(size + expand, interpolation=T.InterpolationMode.BILINEAR), size, k
        self.tail = T.Compose([T.ToTensor(), normalize])

    def __call__(self, image):
        from torchvision.transforms import functional as TF
        return self.tail(TF.five_crop(self.resize(image), self.size)[self.k])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    frame.add_io_args(p, "class prompts")
    p.add_argument("--tuner", choices=TUNERS, default="adaptformer",
                   help="lightweight module in the frozen tower (code: adaptformer for the main results)")
    p.add_argument("--adapter-dim", type=int, default=0, help="AdaptFormer / LoRA bottleneck; 0: LIFT's rule")
    p.add_argument("--vpt-len", type=int, default=10, help="prompts per layer with --tuner vpt (code: 10)")
    p.add_argument("--epochs", type=int, help=common.recipe_help(RECIPES, "epochs", "epochs"))
    p.add_argument("--lr", type=float, help=common.recipe_help(RECIPES, "lr", "SGD learning rate, cosine per epoch"))
    p.add_argument("--batch-size", type=int, help=common.recipe_help(RECIPES, "batch_size", "images per step"))
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (code: 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (code: 5e-4)")
    p.add_argument("--crop-min", type=float, default=0.08,
                   help="smallest area fraction of the training crop, RandomResizedCrop's scale (code: 0.08)")
    p.add_argument("--scale", type=float, default=25.0, help="cosine classifier scale (code: 25)")
    p.add_argument("--tau", type=float, default=1.0, help="logit adjustment of the loss (code: LA, tau 1)")
    p.add_argument("--tte-expand", type=int, default=24, help="TTE: enlarge by this many px at 224, scaled with the "
                                                              "input size (code: 24)")
    frame.add_run_args(p, selection="last")
    args = p.parse_args(argv)

    # ---- setup ----
    device, out = frame.setup(args, "lift", RECIPES)
    base_lr = args.lr * args.lr_scale

    # ---- data ----
    classnames, text, samples, counts, _, split, test = frame.load_data(args)
    num_classes = len(classnames)
    log_prior = torch.log(torch.from_numpy(common.class_prior(counts))).float().to(device)
    batch = common.cap_batch(args.batch_size, len(samples))
    steps_per_epoch = len(samples) // batch

    # ---- model ----
    clip, _, preprocess_val, model_name = common.load_clip(args.model, args.pretrained, device)
    common.drop_text_tower(clip)
    layers = len(common.vit_blocks(clip.visual, f"LIFT's {args.tuner} tuner"))  # before any training starts
    dim = args.adapter_dim or adapter_width(num_classes, layers)
    model = Lift(clip.visual, args.tuner, dim, args.vpt_len, text["classname"].float(), args.scale).to(device)
    params = model.trained()
    meta = frame.make_meta("systems.lift", args, classnames, samples, text, model_name, split, test)
    phases = frame.Phases(out, meta, args, args.resume, common.parser_defaults(p, args))
    print(f"LIFT on {args.dataset}: frozen tower {common.count_parameters(clip.visual)[0] / 1e6:.2f}M; trained "
          f"{sum(q.numel() for q in params) / 1e6:.3f}M ({args.tuner}" + (f", bottleneck {dim}" if args.tuner in
                                                                            ("adaptformer", "lora") else "")
          + f", classifier); {args.epochs} epochs of {steps_per_epoch} steps of {batch}")

    # ---- loop: the logit-adjusted loss, SGD, cosine per epoch ----
    sampler = common.Batches()
    transform = frame.train_transform(preprocess_val, scale=(args.crop_min, 1.0), interpolation="bilinear")
    loader, to_device = common.image_loader(samples, transform, args.decode, device, seed=args.seed,
                                            workers=args.workers, batch_sampler=sampler)
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=args.momentum, weight_decay=args.weight_decay)

    def epoch_batches(epoch):  # shuffled, the last incomplete batch dropped
        sampler.batches = frame.shuffled_batches(len(samples), batch, steps_per_epoch, args.seed, epoch)
        return loader

    def la_loss(images_labels):
        images, y = to_device(images_labels)
        with common.image_autocast(device):
            logits = model(images)
        return logit_adjusted_loss(logits.float(), y, log_prior, args.tau)

    # CosineAnnealingLR(T_max = epochs), stepped after each epoch: epoch e (from 0) trains at 0.5 lr (1 + cos(pi e / E))
    per_epoch = lambda step, total: 0.5 * base_lr * (1 + math.cos(math.pi * (step // steps_per_epoch) / args.epochs))
    modules = {"lift": nn.ParameterList(params)}
    done = phases.finished("lift", args.epochs)
    if done:
        modules["lift"].load_state_dict(done["modules"]["lift"])
    else:
        model.train()
        phases.run("lift", modules, optimizer, args.epochs, epoch_batches, la_loss, per_epoch)
    model.eval()

    # ---- evaluation: CLIP's evaluation transform, then LIFT's test-time ensemble of five crops ----
    from torchvision import transforms as T
    size = next(t.size for t in preprocess_val.transforms if isinstance(t, T.CenterCrop))[0]
    normalize = next(t for t in preprocess_val.transforms if isinstance(t, T.Normalize))
    expand = max(1, round(args.tte_expand * size / 224))
    logits_of = lambda transform, what: common.encode_split({"z": model}, test, transform, device,
                                                            workers=args.workers, desc=what, normalize=False)["z"]
    with torch.no_grad():
        plain = logits_of(preprocess_val, "eval")
        tte = sum(logits_of(FiveCropPick(size, expand, k, normalize), f"tte crop {k + 1}/5") for k in range(5)) / 5
    truth = np.array([y for _, y, _ in test])
    training = dict(optimizer_steps=phases.steps["lift"], lr=base_lr, trainable_params=sum(q.numel() for q in params),
                    selection=args.select, batch_size=batch)
    results = frame.write_results(out, "LIFT", {"lift": plain.argmax(1).numpy(), "lift_tte": tte.argmax(1).numpy()},
                                  truth, counts, args.shot_rule, meta, titles={
                                      "lift": f"{args.tuner}, logit-adjusted loss (not in the HLC paper)",
                                      "lift_tte": f"{args.tuner} + test-time ensembling (not in the HLC paper)"},
                                  training=training)
    phases.done()  # the results are written: an interrupted run's last.pt goes
    v = results["variants"]
    print(f"LIFT on {args.dataset} {split}: {v['lift']['overall']:.2f}, with TTE {v['lift_tte']['overall']:.2f} "
          f"({common.groups_line(v['lift_tte'])}) -> {out}")


if __name__ == "__main__":
    common.run_script(main)
