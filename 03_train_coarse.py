"""Stage 03: VPT-deep prompts + cosine classifier + descriptor weights, trained on mixed image/text features.

Reads   the train split under DATA_ROOT, text_features.pt (stage 02), the CLIP model.
Writes  coarse.pt (prompts, classifier, descriptor weights W_llm, class counts, meta) when training completes;
        last.pt after every epoch (resume with --resume) and log.jsonl (one line per epoch) next to it.

    python 03_train_coarse.py --dataset places_lt --data-root data/places_lt \
        --features runs/places_lt/text_features.pt --out runs/places_lt/coarse.pt

Each step (paper section 3.1): B images through VPT-deep CLIP and B_t class-balanced corpus features are
concatenated, mixed with a shuffled copy (SFM, Eq. 2) and classified by the cosine classifier (Eq. 1); the
descriptor weights learn from the image features through Algorithm 1's score. Typical time: Places-LT, 30
epochs, about 2 h on one A100-class GPU; the toy world about 2 min on a 2-core CPU.
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common


def lr_at(step, total, warmup, base_lr):
    """Linear warm-up, then cosine decay to zero (paper: cosine decay from 5e-4)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return 0.5 * base_lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class CorpusSampler:
    """Class-balanced draws from the cached corpus features: a uniform class, then one of its sentences."""

    def __init__(self, labels, num_classes):
        order = torch.argsort(labels, stable=True)
        self.order = order
        self.counts = torch.bincount(labels, minlength=num_classes)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.classes = torch.nonzero(self.counts).flatten()

    def sample(self, n, generator):
        cls = self.classes[torch.randint(len(self.classes), (n,), generator=generator)]
        offset = (torch.rand(n, generator=generator) * self.counts[cls]).long()
        return self.order[self.starts[cls] + offset], cls


def save_checkpoint(path, state):
    common.atomic_torch_save(state, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="imagenet_lt, places_lt, inat2018, or any name (generic layout)")
    p.add_argument("--data-root", required=True, help="dataset root")
    p.add_argument("--features", required=True, help="text_features.pt from stage 02")
    p.add_argument("--out", required=True, help="coarse.pt to write (last.pt and log.jsonl go next to it)")
    p.add_argument("--model", default="ViT-B-16-quickgelu", help="open_clip model name or config JSON (must match stage 02)")
    p.add_argument("--pretrained", default="openai", help="hub tag, local file, or none (must match stage 02)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (paper: 30)")
    p.add_argument("--lr", type=float, default=5e-4, help="initial learning rate (paper: 5e-4)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (paper: not given)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up (paper: not given)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step, B (paper: not given)")
    p.add_argument("--corpus-ratio", type=float, default=1.0,
                   help="corpus features per image, B_t / B; 0 trains on images alone (paper: not given)")
    p.add_argument("--mixup-alpha", type=float, default=0.2,
                   help="SFM: lambda ~ Beta(alpha, alpha); 0 turns mixup off (paper: not given)")
    p.add_argument("--scale", type=float, default=25.0, help="cosine classifier scale s, Eq. 1 (paper: not given)")
    p.add_argument("--desc-temp", type=float, default=0.0,
                   help="temperature t of the descriptor loss; 0 = CLIP's own logit scale (paper: not given)")
    p.add_argument("--desc-loss-weight", type=float, default=1.0,
                   help="weight of the descriptor loss; 0 leaves W_llm uniform (paper: not given, summed)")
    p.add_argument("--desc-loss-la", type=float, default=1.0,
                   help="logit-adjusted descriptor loss: add this * log(pi) to the descriptor scores during training, "
                        "so the re-ranker is not biased to head classes; 0 = plain cross-entropy (paper: not given)")
    p.add_argument("--prompt-tokens", type=int, default=20, help="VPT tokens per layer N; 0 = linear probe (paper: 20)")
    p.add_argument("--prompt-depth", type=int, default=12, help="layers with prompts L_p (paper: 12)")
    p.add_argument("--workers", type=int, default=8, help="data loader worker processes")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--log-every", type=int, default=50, help="print a line every this many steps")
    p.add_argument("--resume", action="store_true", help="continue from last.pt next to --out")
    args = p.parse_args(argv)

    # ---- setup ----
    device = common.pick_device(args.device)
    out = Path(args.out)
    last_path, log_path = out.with_name("last.pt"), out.with_name("log.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    # ---- data ----
    text = common.load_checkpoint(args.features, "stage 02 (02_cache_descriptors.py)")
    classnames = common.class_names(args.dataset, args.data_root)
    num_classes = len(classnames)
    model_name = common.resolve_model_name(args.model)
    common.check_meta(text["meta"], args.features, num_classes=num_classes, model=model_name,
                      pretrained=args.pretrained)
    samples = common.read_split(args.data_root, args.dataset, "train", num_classes)
    counts = common.class_counts(samples, num_classes)
    if (counts == 0).any():
        print(f"warning: {(counts == 0).sum()} classes have no training image; their prior counts as 1")

    # ---- model ----
    clip, preprocess_train, _, _ = common.load_clip(args.model, args.pretrained, device)
    common.drop_text_tower(clip)  # the text encoder runs in stage 02 only
    vpt = common.PromptedVisual(clip.visual, args.prompt_tokens, args.prompt_depth).to(device)
    embed_dim = text["classname"].shape[1]
    common.check_meta(text["meta"], args.features, embed_dim=clip.visual.output_dim)
    w_cls = torch.nn.Parameter(text["classname"].clone().to(device))  # kit choice: init from class-name prompts
    w_llm = torch.nn.Parameter(torch.zeros(text["desc_mask"].shape, device=device))  # zero: plain average at start
    desc_feats, desc_mask = text["descriptors"].to(device), text["desc_mask"].to(device)
    corpus_feats = text["corpus"].to(device)
    corpus = CorpusSampler(text["corpus_labels"], num_classes)
    desc_temp = args.desc_temp or text["logit_scale"]
    log_prior = torch.log(torch.from_numpy(common.class_prior(counts))).to(device)  # (C,)
    trainable = [vpt.prompts, w_cls, w_llm]
    total, _ = common.count_parameters(clip)
    n_train = sum(t.numel() for t in trainable)
    print(f"CLIP {model_name}: {total / 1e6:.2f}M parameters, frozen; trainable {n_train / 1e6:.3f}M "
          f"(prompts {vpt.prompts.numel()}, classifier {w_cls.numel()}, descriptor weights {w_llm.numel()})")

    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(samples) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"batch size {args.batch_size} is larger than the training set ({len(samples)} images)")
    total_steps, warmup = steps_per_epoch * args.epochs, int(args.warmup_epochs * steps_per_epoch)
    n_text = int(round(args.corpus_ratio * args.batch_size))

    start_epoch = 0
    if args.resume and last_path.exists():
        state = common.load_checkpoint(last_path, "an earlier run of this stage")
        common.check_meta(state["meta"], last_path, num_classes=num_classes, model=model_name)
        with torch.no_grad():
            vpt.prompts.copy_(state["prompts"]), w_cls.copy_(state["w_cls"]), w_llm.copy_(state["w_llm"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"]
        print(f"resumed from {last_path} after epoch {start_epoch}")
    elif log_path.exists():
        log_path.unlink()

    loader_kw = dict(batch_size=args.batch_size, drop_last=True, num_workers=args.workers,
                     pin_memory=device.type == "cuda", persistent_workers=False)
    if args.workers:
        loader_kw["prefetch_factor"] = 4
    dataset = common.ImageList(samples, preprocess_train)
    meta = common.make_meta("03_train_coarse", args, dataset=args.dataset, num_classes=num_classes, model=model_name,
                            pretrained=args.pretrained, embed_dim=int(embed_dim))

    # ---- loop ----
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, args.epochs):
        # every epoch's randomness comes from (seed, epoch) alone, so a resumed run repeats it exactly
        torch.manual_seed(args.seed * 1000 + epoch)
        gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        loader = torch.utils.data.DataLoader(dataset, shuffle=True, generator=gen, **loader_kw)
        vpt.train()
        t_epoch, seen, loss_sum = time.time(), 0, torch.zeros((), device=device)
        for i, (images, labels) in enumerate(loader):
            lr = lr_at(step, total_steps, warmup, args.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with common.image_autocast(device):
                v = F.normalize(vpt(images).float(), dim=-1)  # (B, d)
            feats, targets = v, labels
            if n_text:  # mixed-modality batch (paper Eq. 1: v = concat(E_V(x_V), E_L(x_L)))
                idx, text_labels = corpus.sample(n_text, gen)
                feats = torch.cat([v, corpus_feats[idx.to(device)].float()])
                targets = torch.cat([labels, text_labels.to(device)])
            soft = F.one_hot(targets, num_classes).float()
            if args.mixup_alpha > 0:  # Eq. 2: SFM in the shared space
                lam = float(np.random.default_rng([args.seed, epoch, i]).beta(args.mixup_alpha, args.mixup_alpha))
                perm = torch.randperm(len(feats), generator=gen).to(device)
                feats, soft = common.mixup(feats, soft, lam, perm)
            loss_cls = common.soft_cross_entropy(common.cosine_logits(feats, w_cls, args.scale), soft)
            loss = loss_cls
            if args.desc_loss_weight:
                desc = desc_temp * common.descriptor_scores(v, desc_feats, desc_mask, w_llm)  # (B, C)
                desc = desc + args.desc_loss_la * log_prior  # LA loss (Menon et al. 2021): a balanced re-ranker
                loss = loss + args.desc_loss_weight * F.cross_entropy(desc, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            seen += len(images)
            step += 1
            if (i + 1) % args.log_every == 0 or i + 1 == steps_per_epoch:
                mean_loss = loss_sum.item() / (i + 1)  # the only host sync, once per log line
                if not math.isfinite(mean_loss):
                    raise SystemExit(f"loss is {mean_loss} at epoch {epoch + 1}, step {i + 1}: stopping. The last "
                                     f"good state is {last_path} (epoch {epoch}); try a lower --lr, then --resume.")
                rate = seen / (time.time() - t_epoch)
                eta = (total_steps - step) * args.batch_size / rate
                print(f"epoch {epoch + 1}/{args.epochs} step {i + 1}/{steps_per_epoch} loss {mean_loss:.4f} "
                      f"lr {lr:.2e} {rate:.1f} img/s eta {eta / 60:.1f} min", flush=True)

        # ---- checkpoint ----
        record = dict(epoch=epoch + 1, loss=round(loss_sum.item() / steps_per_epoch, 5), lr=lr,
                      seconds=round(time.time() - t_epoch, 2), img_per_s=round(seen / (time.time() - t_epoch), 2))
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        save_checkpoint(last_path, dict(prompts=vpt.prompts.detach().cpu(), w_cls=w_cls.detach().cpu(),
                                        w_llm=w_llm.detach().cpu(), optimizer=optimizer.state_dict(),
                                        epoch=epoch + 1, meta=meta))

    # ---- save ----
    common.atomic_torch_save(dict(prompts=vpt.prompts.detach().cpu(), w_cls=w_cls.detach().cpu(),
                                  w_llm=w_llm.detach().cpu(), class_counts=torch.from_numpy(counts),
                                  prompt_tokens=args.prompt_tokens, prompt_depth=vpt.depth, scale=args.scale,
                                  meta=meta), out)
    print(f"trained {args.epochs} epochs ({total_steps} steps of {args.batch_size} images + {n_text} texts) -> {out}")


if __name__ == "__main__":
    main()
