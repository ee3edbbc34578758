"""BALLAD (Ma et al. 2021, "A simple long-tailed recognition baseline via vision-language model"), on the kit.

Phase A fine-tunes CLIP's visual tower on the long-tailed training set with instance-balanced sampling; the logits
are CLIP's logit scale (100) times the cosine between the image feature and each class's text feature, and the loss
is cross-entropy. Phase B freezes everything and trains a linear adapter on the image feature,
f* = lambda * A(f) + (1 - lambda) * f (paper Eq. 2), with class-balanced sampling (4 images of a class per draw).

Reads   the train and evaluation splits, text_features.pt (stage 02: the class-prompt features are the classifier).
Writes  $(RUN)/systems/ballad/: results.json (variants ballad_phase_a and ballad), results.md, predictions.npz,
        log.jsonl, phase_a.pt and phase_b.pt (each phase when done), last.pt (the phase in progress; --resume).

    python -m systems.ballad --dataset places_lt --data-root data/places_lt --features runs/places_lt/text_features.pt \
        --out runs/places_lt/systems/ballad

Where the kit departs from the original (gaopengcuhk/BALLAD, whose defaults the flags follow, as the published
numbers came from that code):
- The text tower stays frozen: phase A trains the visual tower against the cached class-prompt features of stage 02
  (the 80-template ensemble; the code uses one template). The original fine-tunes both towers in phase A; its own
  ablation (BALLAD Table 4, ResNet-50, ImageNet-LT) has the visual tower alone at 66.3 against 66.1 for both.
- Phase B trains on features of the frozen phase-A tower encoded once with the evaluation transform; the original
  runs the tower on augmented images at every step of phase B.
- The adapter is the code's, A(f) = W f with no bias and no ReLU, lambda = 0.2; --adapter paper uses the paper's
  ReLU(W^T f + b). Epochs of phase B are the code's class-aware epochs (max_c n_c x C images).
- Evaluation uses CLIP's evaluation transform (resize, centre crop), as every variant of the kit.
TACKLE (the same paper's second method) retrieves web images for the tail classes from CC3M/CC12M/SBU; there is no
web-scale image pool here, so the kit does not offer it.

Published (ViT-B/16): Places-LT 49.3 / 50.2 / 48.4 / 49.5 (many / medium / few / all, HLC Table 1); ImageNet-LT 75.7
overall (BALLAD Table 1); iNaturalist 2018 ResNet-50 only (74.2). Toy world, 2-core CPU: see the README ("Compared
systems") for the measured time and numbers.
"""
import argparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common


class Adapter(nn.Module):
    """f* = ratio * A(f) + (1 - ratio) * f. code: A(f) = W f (no bias, no ReLU); paper: A(f) = ReLU(W^T f + b)."""

    def __init__(self, dim, ratio=0.2, kind="code"):
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=kind == "paper")
        self.ratio, self.kind = ratio, kind

    def forward(self, f):
        a = self.linear(f)
        return self.ratio * (F.relu(a) if self.kind == "paper" else a) + (1 - self.ratio) * f


def clip_logits(features, text, scale):
    """scale * cos(image feature, class text feature): features (B, d) raw, text (C, d) normalised -> (B, C)."""
    return scale * F.normalize(features, dim=-1) @ text.T


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="imagenet_lt, places_lt, inat2018, or any name (generic layout)")
    p.add_argument("--data-root", required=True, help="dataset root")
    p.add_argument("--features", required=True, help="text_features.pt from stage 02 (class-prompt features)")
    p.add_argument("--out", required=True, help="folder to write (results.json, predictions.npz, checkpoints)")
    p.add_argument("--model", default="ViT-B-16-quickgelu", help="open_clip model name or config JSON (must match)")
    p.add_argument("--pretrained", default="openai", help="hub tag, local file, or none (must match)")
    p.add_argument("--epochs", type=int, default=0, help="set both phases to this many epochs (0: --epochs-a, -b)")
    p.add_argument("--epochs-a", type=int, default=50, help="phase A epochs (code: 50)")
    p.add_argument("--epochs-b", type=int, default=10, help="phase B epochs, class-aware (code: 10)")
    p.add_argument("--lr-a", type=float, default=1e-5, help="phase A SGD learning rate, cosine to 0 (code: 1e-5)")
    p.add_argument("--lr-b", type=float, default=0.2, help="phase B SGD learning rate, cosine to 0 (code: 0.2)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (code: 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay (code: 5e-4)")
    p.add_argument("--batch-size", type=int, default=512, help="images per step, both phases (code: 512)")
    p.add_argument("--per-class", type=int, default=4, help="phase B: images of a class per draw (code: 4)")
    p.add_argument("--ratio", type=float, default=0.2, help="adapter residual factor lambda (code: 0.2)")
    p.add_argument("--adapter", choices=["code", "paper"], default="code",
                   help="code: A(f) = W f; paper: A(f) = ReLU(W^T f + b) (paper Eq. 2)")
    p.add_argument("--logit-scale", type=float, default=100.0, help="scale of the cosine logits (code: 100)")
    p.add_argument("--crop-scale", type=float, default=0.5, help="phase A RandomResizedCrop scale floor (code: 0.5)")
    p.add_argument("--jitter", type=float, default=0.4, help="phase A colour jitter (code: 0.4), with flips")
    p.add_argument("--grad-checkpointing", action="store_true", help="phase A: recompute activations (less memory)")
    common.add_system_run_args(p)
    args = p.parse_args(argv)

    # ---- setup ----
    device, out = common.system_setup(args, "ballad")
    epochs_a, epochs_b = (args.epochs, args.epochs) if args.epochs else (args.epochs_a, args.epochs_b)

    # ---- data ----
    classnames, text, samples, counts, split, test = common.system_data(args)
    num_classes = len(classnames)
    labels = torch.tensor([y for _, y, _ in samples])

    # ---- model: the visual tower trains in phase A; the class-prompt features are the (frozen) classifier ----
    clip, _, preprocess_val, model_name = common.load_clip(args.model, args.pretrained, device)
    common.drop_text_tower(clip)
    visual = clip.visual
    classifier = F.normalize(text["classname"].float(), dim=-1).to(device)  # (C, d)
    adapter = Adapter(visual.output_dim, args.ratio, args.adapter).to(device)
    meta = common.make_meta("systems.ballad", args, dataset=args.dataset, num_classes=num_classes, model=model_name,
                            pretrained=args.pretrained, classnames_digest=common.names_digest(classnames),
                            train_split_digest=common.split_digest(samples, args.data_root),
                            text_features_digest=text["meta"]["digest"])
    ckpt = common.PhaseCheckpoints(out, meta, args, args.resume)
    total, _ = common.count_parameters(visual)
    print(f"BALLAD on {args.dataset}: visual tower {total / 1e6:.2f}M parameters (trained in phase A), adapter "
          f"{sum(p.numel() for p in adapter.parameters()) / 1e6:.3f}M (phase B, {args.adapter}); text tower frozen")

    sgd = lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)

    # ---- phase A: the visual tower against the class prompts, instance-balanced sampling ----
    done = ckpt.finished("phase_a")
    if done:
        visual.load_state_dict(done["modules"]["visual"])
        print(f"phase A: loaded {out / 'phase_a.pt'}")
    else:
        visual.requires_grad_(True).train()
        visual.set_grad_checkpointing(args.grad_checkpointing)
        sampler = common.Batches()
        transform = common.system_train_transform(preprocess_val, scale=(args.crop_scale, 1.0), jitter=args.jitter)
        loader, to_device = common.image_loader(samples, transform, args.decode, device, seed=args.seed,
                                                workers=args.workers, batch_sampler=sampler)

        def phase_a_batches(epoch):  # instance-balanced: a fresh permutation each epoch
            perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
            sampler.batches = [[(epoch, j) for j in b.tolist()] for b in perm.split(args.batch_size)]
            return loader

        def phase_a_loss(batch):
            images, y = to_device(batch)
            with common.image_autocast(device):
                f = visual(images)
            return F.cross_entropy(clip_logits(f.float(), classifier, args.logit_scale), y)

        ckpt.run_epochs("phase_a", {"visual": visual}, sgd(visual.parameters(), args.lr_a), args.lr_a, epochs_a,
                        phase_a_batches, phase_a_loss)  # SGD, cosine to 0 (the code's)
    visual.eval().requires_grad_(False)

    # ---- phase B: the adapter on features of the frozen phase-A tower (encoded once), class-balanced sampling ----
    encode = lambda items, what: common.encode_split({"f": visual}, items, preprocess_val, device, workers=args.workers,
                                                     desc=what, normalize=False)["f"]
    done = ckpt.finished("phase_b")
    if done:
        adapter.load_state_dict(done["modules"]["adapter"])
        print(f"phase B: loaded {out / 'phase_b.pt'}")
    else:
        feats = encode(samples, "encode train").to(device)  # (N, d), the phase-A tower's raw output

        balanced = lambda epoch: [b.to(device) for b in common.class_aware_batches(
            labels, num_classes, args.per_class, args.batch_size, torch.Generator().manual_seed(args.seed * 1000 + epoch))]
        adapter_loss = lambda idx: F.cross_entropy(clip_logits(adapter(feats[idx]), classifier, args.logit_scale),
                                                   labels_device[idx])
        labels_device = labels.to(device)
        ckpt.run_epochs("phase_b", {"adapter": adapter}, sgd(adapter.parameters(), args.lr_b), args.lr_b, epochs_b,
                        balanced, adapter_loss)

    # ---- evaluation: one pass of the phase-A tower over the test images ----
    with torch.no_grad():
        f = encode(test, "eval").to(device)
        preds = {"ballad_phase_a": clip_logits(f, classifier, args.logit_scale).argmax(1).cpu().numpy(),
                 "ballad": clip_logits(adapter(f), classifier, args.logit_scale).argmax(1).cpu().numpy()}
    truth = np.array([y for _, y, _ in test])
    results = common.write_system_results(out, "BALLAD", preds, truth, counts, args.shot_rule, meta, titles={
        "ballad_phase_a": "phase A only (fine-tuned visual tower)", "ballad": "phase A + balanced adapter"})
    v = results["variants"]
    print(f"BALLAD on {args.dataset} {split}: phase A {v['ballad_phase_a']['overall']:.2f}, with adapter "
          f"{v['ballad']['overall']:.2f} (many {v['ballad']['many']} / med {v['ballad']['medium']} / few "
          f"{v['ballad']['few']}) -> {out}")


if __name__ == "__main__":
    common.run_script(main)
