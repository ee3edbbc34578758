"""Stage 03: VPT-deep prompts + cosine classifier + descriptor weights, trained on mixed image/text features.

Reads   the train split under DATA_ROOT, text_features.pt (stage 02), the CLIP model.
Writes  coarse.pt (prompts, classifier, descriptor weights W_llm, class counts, meta; the visual tower too with
        --finetune full) when training completes; last.pt after every epoch (resume with --resume) and log.jsonl;
        with --feature-cache and no prompts (linear probe), the frozen tower's training features in that folder.

    python 03_train_coarse.py --dataset places_lt --data-root data/places_lt \
        --features runs/places_lt/text_features.pt --out runs/places_lt/coarse.pt
    torchrun --nproc_per_node=4 03_train_coarse.py ...      # same results as one process with the same --batch-size

Each step (paper section 3.1): B images through VPT-deep CLIP and B_t class-balanced corpus features are
concatenated, mixed with a shuffled copy (SFM, Eq. 2) and classified by the cosine classifier (Eq. 1); the
descriptor weights learn from the image features through Algorithm 1's score. --batch-size is the global batch:
under torchrun each of N processes takes B / N images of every step, and the loss is computed on the gathered
batch, so N processes follow one process step for step. Typical time: the toy world (20 epochs of 1,609
images) 35 to 72 s for the whole stage on 2-core CPUs, training at 480 to 1,350 images/s.
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ---- recipes: the paper's settings per benchmark, and the toy world's (docs/systems.md, "same budget"). A flag
#      overrides one value ----
RECIPES = {
    # paper Sec. 4.2: 30 epochs, lr 5e-4, cosine decay, 20 prompt tokens in each of the 12 layers; batch: the kit's
    # (not given); the visual tower frozen, only prompts and heads trained
    "default": dict(epochs=30, lr=5e-4, batch_size=128, prompt_tokens=20, lr_scale=1.0, finetune="prompts",
                    backbone_lr=1e-5),
    # paper Sec. 4.2, iNaturalist 2018: "the full finetuning strategy (visual branch and classifier)"; the tower's lr is
    # not given (kit: 1e-5, AdamW)
    "inat2018": dict(finetune="full"),
    # the toy world: every method gets the same number of optimizer steps (docs/systems.md, the rules) at batch 32,
    # and its learning rate x lr_scale, picked on the val split by `make tune-toy` from the grid 0.3 to 3000;
    # its 2 prompts per layer are an eighth of its 17 tokens, as ViT-B/16's 20 are of 197
    "toy": dict(epochs=20, batch_size=32, prompt_tokens=2, lr_scale=100.0),
}


class CorpusSampler:
    """Class-balanced draws from the cached corpus features: a uniform class, then one of its sentences."""

    def __init__(self, labels, num_classes):
        self.order = torch.argsort(labels, stable=True)
        self.counts = torch.bincount(labels, minlength=num_classes)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.classes = torch.nonzero(self.counts).flatten()

    def sample(self, n, generator):
        cls = self.classes[torch.randint(len(self.classes), (n,), generator=generator)]
        offset = (torch.rand(n, generator=generator) * self.counts[cls]).long()
        return self.order[self.starts[cls] + offset], cls


def global_batches(n, batch, world, rank, generator):
    """This process's share of every global batch of one epoch: a seeded permutation cut into batches of
    `batch`, each split into `world` contiguous slices (rank r takes slice r)."""
    perm = torch.randperm(n, generator=generator)
    local = batch // world
    return [perm[s * batch + rank * local:s * batch + (rank + 1) * local].tolist() for s in range(n // batch)]


class Coarse(nn.Module):
    """What stage 03 trains, as one module so DistributedDataParallel can wrap it: VPT-deep prompts around the
    frozen (or, with --finetune full, trainable) visual tower, the cosine classifier W_cls and W_llm."""

    def __init__(self, visual, tokens, depth, w_cls, desc_shape):
        super().__init__()
        self.vpt = common.PromptedVisual(visual, tokens, depth)
        self.w_cls = nn.Parameter(w_cls.clone())  # (C, d), from classifier_start
        self.w_llm = nn.Parameter(torch.zeros(desc_shape))  # zero: softmax gives the plain average at start
        self.takes_features = False  # frozen tower, no prompts: forward gets the cached features

    def forward(self, images):
        if self.takes_features:
            return F.normalize(images.float(), dim=-1)
        return F.normalize(self.vpt(images).float(), dim=-1)  # (B, d)


def classifier_start(classname_feats, how, seed):
    """W_cls before training (C, d): the class-name prompt features ("text", the kit's choice: every class starts
    where zero-shot CLIP puts it), or random unit rows from their own generator ("random": a plain probe, which knows
    no text until the corpus gives it some; the prompts' start is the same either way)."""
    if how == "text":
        return classname_feats
    rows = torch.randn(classname_feats.shape, generator=torch.Generator().manual_seed(seed))
    return F.normalize(rows, dim=-1).to(classname_feats.dtype)


def epoch_draws(steps, n_text, micro, mixup, corpus, gen, device):
    """Every micro-step's corpus draw and mixup permutation for one epoch, in the order the loop used to draw
    them one by one, moved to the device in one copy each: the loop itself then never waits for the device."""
    idx, labels, perms = [], [], []
    for _ in range(steps):
        if n_text:
            i, y = corpus.sample(n_text, gen)
            idx.append(i)
            labels.append(y)
        if mixup:
            perms.append(torch.randperm(micro + n_text, generator=gen))
    stack = lambda xs: torch.stack(xs).to(device, non_blocking=True) if xs else None
    return dict(corpus=stack(idx), corpus_labels=stack(labels), perm=stack(perms))


def train_features(tower, samples, transform, device, rank, world, args, model_id):
    """The frozen tower's features of the training images (linear probe), from --feature-cache when there."""
    path = None
    if args.feature_cache:
        path = common.feature_cache_file(args.feature_cache, "train", samples, model_id, args.pretrained,
                                         args.image_size, transform,
                                         common.effective_precision(device, args.precision))
        cached = common.load_cached_features(path, len(samples))  # its name hashes the model, transform and images
        if cached is not None:
            print(f"frozen tower: training features from {path}") if rank == 0 else None
            return cached
    t = time.time()
    feats = common.encode_split({"plain": tower}, samples, transform, device, rank, world, workers=args.workers,
                                decode=args.decode, desc="encode train", precision=args.precision)["plain"]
    if rank == 0:
        print(f"frozen tower: encoded {len(samples)} training images once in {time.time() - t:.1f}s"
              + (f" -> {path}" if path else ""))
        if path:
            common.atomic_torch_save(feats, path)
    return feats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="imagenet_lt, places_lt, inat2018, or any name (generic layout)")
    p.add_argument("--data-root", required=True, help="dataset root")
    p.add_argument("--features", required=True, help="text_features.pt from stage 02")
    p.add_argument("--out", required=True, help="coarse.pt to write (last.pt and log.jsonl go next to it)")
    p.add_argument("--model", default="ViT-B-16-quickgelu",
                   help="open_clip model name or config JSON (must match stage 02)")
    p.add_argument("--pretrained", default="openai", help="hub tag, local file, or none (must match stage 02)")
    p.add_argument("--epochs", type=int, help=common.recipe_help(RECIPES, "epochs", "training epochs (paper: 30)"))
    p.add_argument("--lr", type=float, help=common.recipe_help(RECIPES, "lr", "initial learning rate (paper: 5e-4)"))
    p.add_argument("--lr-scale", type=float, help=common.recipe_help(RECIPES, "lr_scale", "multiplies every learning "
                                                                      "rate (make tune-toy's grid)"))
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (paper: not given)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up (paper: not given)")
    p.add_argument("--batch-size", type=int, help=common.recipe_help(RECIPES, "batch_size", "global batch of images "
                                                                      "per step, B (paper: not given)"))
    p.add_argument("--accum-steps", type=int, default=1,
                   help="split each step into this many micro-batches (gradients summed; mixup per micro-batch)")
    p.add_argument("--corpus-ratio", type=float, default=1.0,
                   help="corpus features per image, B_t / B; 0 trains on images alone (paper: not given)")
    p.add_argument("--mixup-alpha", type=float, default=0.2,
                   help="SFM: lambda ~ Beta(alpha, alpha); 0 turns mixup off (paper: not given)")
    p.add_argument("--scale", type=float, default=25.0, help="cosine classifier scale s, Eq. 1 (paper: not given)")
    p.add_argument("--desc-temp", type=float, default=0.0,
                   help="temperature t of the descriptor loss; 0 = CLIP's own logit scale (paper: not given)")
    p.add_argument("--cls-init", choices=["text", "random"], default="text",
                   help="W_cls's start: the class-name prompt features, or random unit rows as a plain linear probe "
                        "starts (docs/toy-world-experiments.md measures both) (paper: not given)")
    p.add_argument("--cls-loss-weight", type=float, default=1.0,
                   help="weight of the classifier's loss; 0 trains the prompts for the descriptor loss alone, as the "
                        "paper's Table 5 'Ours' and Table 6 N/A model (make tables: ablation na) (paper: 1)")
    p.add_argument("--desc-loss-weight", type=float, default=1.0,
                   help="weight of the descriptor loss; 0 leaves W_llm uniform (paper: not given, summed)")
    p.add_argument("--desc-loss-la", type=float, default=1.0,
                   help="logit-adjusted descriptor loss: add this * log(pi) to the descriptor scores during training, "
                        "so the re-ranker is not biased to head classes; 0 = plain cross-entropy (paper: not given)")
    p.add_argument("--prompt-tokens", type=int, help=common.recipe_help(RECIPES, "prompt_tokens", "VPT tokens per "
                                                                         "layer N; 0 = linear probe (paper: 20)"))
    p.add_argument("--prompt-depth", type=int, default=12, help="layers with prompts L_p (paper: 12)")
    p.add_argument("--finetune", choices=["prompts", "full"], help=common.recipe_help(
        RECIPES, "finetune", "train the prompts only, or the whole visual tower too (paper: full on iNaturalist 2018)"))
    p.add_argument("--backbone-lr", type=float, help=common.recipe_help(
        RECIPES, "backbone_lr", "learning rate of the visual tower with --finetune full (paper: not given)"))
    p.add_argument("--image-size", type=int, default=0, help="input size, e.g. 336 for HLC@336 (0: the model's own)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute block activations in backward (less memory)")
    p.add_argument("--compile", action="store_true", help="torch.compile the image tower")
    p.add_argument("--precision", choices=sorted(common.PRECISIONS), default="auto",
                   help="image tower arithmetic: " + "; ".join(f"{k}: {v}" for k, v in common.PRECISIONS.items()))
    p.add_argument("--workers", type=int, default=8, help="data loader worker processes per training process")
    p.add_argument("--decode", choices=sorted(common.DECODE_MODES), default="pil",
                   help="where images are decoded and resized: " + "; ".join(f"{k}: {v}" for k, v in
                                                                          common.DECODE_MODES.items()))
    p.add_argument("--feature-cache", default="",
                   help="folder for the frozen tower's features (linear probe), reused by later runs")
    p.add_argument("--augment-frozen", action="store_true",
                   help="linear probe: run the frozen tower on augmented images every epoch instead of encoding "
                        "the training set once (evaluation transform, as CLIP's linear-probe protocol)")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto (under torchrun: one GPU per process)")
    p.add_argument("--seed", type=common.seed_value, default=0, help="random seed")
    p.add_argument("--log-every", type=int, default=50, help="print a line every this many steps")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted training in last.pt next to --out; refused when a training setting "
                        "differs (Make: RESUME=1)")
    p.add_argument("--fresh", action="store_true",
                   help="remove an interrupted training's last.pt and start over (Make: FRESH=1); without this or "
                        "--resume, a last.pt stops the run")
    args = p.parse_args(argv)
    common.apply_recipe(args, RECIPES)
    common.note_for_memory('TRAIN_ARGS="--grad-checkpointing" recomputes activations instead of keeping them (RESUME=1 '
                           'may add it), --accum-steps 2 takes each batch in two halves (a new training)')
    common.refuse_out_of_range(
        args, least=[("--epochs", 1), ("--batch-size", 1), ("--accum-steps", 1), ("--warmup-epochs", 0),
                        ("--weight-decay", 0), ("--corpus-ratio", 0), ("--mixup-alpha", 0), ("--desc-temp", 0),
                        ("--cls-loss-weight", 0), ("--desc-loss-weight", 0), ("--prompt-tokens", 0),
                        ("--prompt-depth", 0), ("--image-size", 0), ("--workers", 0), ("--log-every", 1)],
        above=[("--lr", 0), ("--lr-scale", 0), ("--backbone-lr", 0), ("--scale", 0)])
    if args.cls_loss_weight == 0 and args.desc_loss_weight == 0:
        raise SystemExit("--cls-loss-weight 0 with --desc-loss-weight 0 leaves no loss to train")
    common.check_folder_to_be(args.feature_cache, "feature cache folder (--feature-cache, FEATURE_CACHE=)")

    # ---- setup ----
    rank, world, device = common.init_distributed(args.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    out = Path(args.out)
    last_path, log_path = out.with_name("last.pt"), out.with_name("log.jsonl")
    if rank == 0:
        common.hold_run_lock(out.parent, f"03_train_coarse.py -> {out}")
    torch.manual_seed(args.seed)

    # ---- data (the evaluation split is checked now, not found broken after the training) ----
    classnames = common.class_names(args.dataset, args.data_root)
    num_classes = len(classnames)
    model_name = common.resolve_model_name(args.model)
    text = common.load_text_features(args.features, classnames, args.data_root, args.model, args.pretrained)
    samples = common.read_split(args.data_root, args.dataset, "train", num_classes)
    common.check_eval_split(args.data_root, args.dataset, "", num_classes, samples)
    counts = common.class_counts(samples, num_classes)
    args.batch_size = common.cap_batch(args.batch_size, len(samples), world * args.accum_steps)
    if args.batch_size % (world * args.accum_steps):
        raise SystemExit(f"--batch-size {args.batch_size} must divide by processes x --accum-steps ({world} x "
                         f"{args.accum_steps})")
    if (counts == 0).any():
        say(f"warning: {(counts == 0).sum()} classes have no training image; their prior counts as 1")

    # ---- model ----
    clip, preprocess_train, preprocess_val, _ = common.load_clip(args.model, args.pretrained, device, args.image_size)
    common.drop_text_tower(clip)  # the text encoder runs in stage 02 only
    common.check_meta(text["meta"], args.features, embed_dim=clip.visual.output_dim)
    model = Coarse(clip.visual, args.prompt_tokens, args.prompt_depth,
                   classifier_start(text["classname"], args.cls_init, args.seed), text["desc_mask"].shape).to(device)
    model.vpt.grad_checkpointing = args.grad_checkpointing
    layers = len(clip.visual.transformer.resblocks) if model.vpt.vit else 0
    if 0 < model.vpt.depth < layers:  # ViT-L/14 has 24: the paper's 12 are all of ViT-B/16's, VPT-deep's every layer
        say(f"note: prompts in the first {model.vpt.depth} of the image tower's {layers} layers "
            f"(--prompt-depth {layers} puts them in every layer, as VPT-deep and the paper's ViT-B/16 do)")
    if args.finetune == "full":
        model.vpt.visual.requires_grad_(True)
    model.vpt.prompts.requires_grad_(model.vpt.prompts.numel() > 0)  # linear probe: nothing to train there
    model.w_llm.requires_grad_(args.desc_loss_weight > 0)  # unweighted ablation: W_llm stays uniform
    desc_feats, desc_mask = text["descriptors"].to(device), text["desc_mask"].to(device)
    corpus_feats = text["corpus"].to(device)
    corpus = CorpusSampler(text["corpus_labels"], num_classes)
    desc_temp = args.desc_temp or text["logit_scale"]
    log_prior = torch.log(torch.from_numpy(common.class_prior(counts))).float().to(device)  # (C,)
    total, _ = common.count_parameters(clip)
    _, n_train = common.count_parameters(model)
    say(f"CLIP {model_name}: {total / 1e6:.2f}M parameters, {'trained' if args.finetune == 'full' else 'frozen'}; "
        f"trainable {n_train / 1e6:.3f}M (prompts {model.vpt.prompts.numel()}, classifier {model.w_cls.numel()}, "
        f"descriptor weights {model.w_llm.numel()}); {world} process(es) on {device}")

    head = [t for t in (model.vpt.prompts, model.w_cls, model.w_llm) if t.requires_grad]
    groups = [dict(params=head, lr_scale=1.0)]
    if args.finetune == "full":
        groups.append(dict(params=list(model.vpt.visual.parameters()), lr_scale=args.backbone_lr / args.lr))
    base_lr = args.lr * args.lr_scale
    optimizer = torch.optim.AdamW(groups, lr=base_lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    steps_per_epoch = len(samples) // args.batch_size
    total_steps, warmup = steps_per_epoch * args.epochs, int(args.warmup_epochs * steps_per_epoch)
    micro = args.batch_size // args.accum_steps  # global micro-batch
    n_text = int(round(args.corpus_ratio * micro))

    facts = common.training_facts(classnames, samples, args.data_root, text)
    meta = common.make_meta("03_train_coarse", args, dataset=args.dataset, num_classes=num_classes, model=model_name,
                            pretrained=args.pretrained, embed_dim=int(model.w_cls.shape[1]), world_size=world,
                            text_features=str(args.features),
                            precision=common.effective_precision(device, args.precision), **facts)
    checkpoint = common.Checkpoint(last_path, meta, args, writer=rank == 0,
                                   defaults=common.parser_defaults(p, args))
    state, start_epoch, history = checkpoint.start(), 0, []
    if state:
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
        missing = [k for k in missing if not k.startswith("vpt.visual.")]  # the frozen tower is not saved
        full = any(k.startswith("vpt.visual.") for k in state["model"])  # a fully fine-tuned tower was saved
        if unexpected or missing or (args.finetune == "full") != full:
            raise SystemExit(f"{last_path} was written by a run with other switches (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}, --finetune {args.finetune}); FRESH=1 starts over")
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]
        if rank == 0:  # the log holds exactly the epochs last.pt has, whatever a kill left in it
            common.atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in history))
    elif rank == 0:
        log_path.unlink(missing_ok=True)

    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                            else None)
    encode = torch.compile(trained) if args.compile else trained
    # the tower learns nothing (linear probe): its features of the training set are computed once
    model.takes_features = model.vpt.prompts.numel() == 0 and args.finetune == "prompts" and not args.augment_frozen
    if model.takes_features:
        cached = train_features(model.vpt, samples, preprocess_val, device, rank, world, args,
                                text["meta"]["model_fingerprint"]).to(device)  # the model by its files' content
        labels_all = torch.tensor([y for _, y, _ in samples]).to(device)
        to_device = lambda batch: batch
    else:
        sampler = common.Batches()
        loader, to_device = common.image_loader(samples, preprocess_train, args.decode, device, seed=args.seed,
                                                workers=args.workers, batch_sampler=sampler)

    def state_dict():  # the trained tensors only: the frozen tower is the pretrained one
        keep = {k: v.detach().cpu() for k, v in model.state_dict().items()
                if args.finetune == "full" or not k.startswith("vpt.visual.")}
        return keep

    # ---- loop ----
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, args.epochs):
        # every epoch's randomness comes from (seed, epoch) alone, so a resumed or N-process run repeats it
        gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        batches = global_batches(len(samples), args.batch_size, world, rank, gen)
        micro_batches = [b[i:i + micro // world] for b in batches for i in range(0, len(b), micro // world)]
        draws = epoch_draws(len(micro_batches), n_text, micro, args.mixup_alpha > 0, corpus, gen,
                            device)  # no host sync in the loop
        if model.takes_features:
            rows = torch.tensor(micro_batches).to(device)  # (steps, b): one copy per epoch
            loader = ((cached[r], labels_all[r]) for r in rows)
        else:
            sampler.batches = [[(epoch, j) for j in b] for b in micro_batches]
        trained.train()
        t_epoch, seen, loss_sum = time.time(), 0, torch.zeros((), device=device)
        correct = torch.zeros((), device=device)  # the classifier on the step's own (unmixed) images
        for i, batch in enumerate(loader):
            k = i % args.accum_steps  # micro-step inside the optimizer step
            if k == 0:
                lr = common.lr_at(step, total_steps, warmup, base_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
            images, labels = to_device(batch)
            with common.image_autocast(device, args.precision):
                v = encode(images)  # (b, d), this process's share
            v = common.gather_rows(v, world)  # (micro, d): the global micro-batch, in single-process order
            labels = common.gather_rows(labels, world) if world > 1 else labels
            feats, targets = v, labels
            if n_text:  # mixed-modality batch (paper Eq. 1: v = concat(E_V(x_V), E_L(x_L)))
                feats = torch.cat([v, corpus_feats[draws["corpus"][i]]])  # same draw on every process
                targets = torch.cat([labels, draws["corpus_labels"][i]])
            soft = F.one_hot(targets, num_classes).float()
            if args.mixup_alpha > 0:  # Eq. 2: SFM in the shared space
                lam = float(np.random.default_rng([args.seed, epoch, i]).beta(args.mixup_alpha, args.mixup_alpha))
                feats, soft = common.mixup(feats, soft, lam, draws["perm"][i])
            loss = args.cls_loss_weight * common.soft_cross_entropy(common.cosine_logits(feats, model.w_cls,
                                                                                   args.scale), soft)
            if args.desc_loss_weight:
                desc = desc_temp * common.descriptor_scores(v, desc_feats, desc_mask, model.w_llm)  # (B, C)
                desc = desc + args.desc_loss_la * log_prior  # LA loss (Menon et al. 2021): a balanced re-ranker
                loss = loss + args.desc_loss_weight * F.cross_entropy(desc, labels)
            if world > 1 and k < args.accum_steps - 1:
                with trained.no_sync():  # accumulate locally; all-reduce on the last micro-step
                    (loss / args.accum_steps).backward()
            else:
                (loss / args.accum_steps).backward()
            loss_sum += loss.detach() / args.accum_steps
            with torch.no_grad():
                correct += (common.cosine_logits(v, model.w_cls, args.scale).argmax(1) == labels).sum()
            seen += len(v)
            if k < args.accum_steps - 1:
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            s = (i + 1) // args.accum_steps
            if s % args.log_every == 0 or s == steps_per_epoch:
                mean_loss = loss_sum.item() / s  # the only host sync, once per log line
                if not math.isfinite(mean_loss):
                    raise SystemExit(f"loss is {mean_loss} at epoch {epoch + 1}, step {s}: stopping. The last "
                                     f"good state is {last_path} (epoch {epoch}); try a lower --lr, then --resume.")
                rate = seen / (time.time() - t_epoch)
                eta = (total_steps - step) * args.batch_size / rate
                say(f"epoch {epoch + 1}/{args.epochs} step {s}/{steps_per_epoch} loss {mean_loss:.4f} "
                    f"lr {lr:.2e} {rate:.1f} img/s eta {eta / 60:.1f} min", flush=True)

        # ---- checkpoint (rank 0 writes; the others wait so that a resume finds it complete). The log line comes
        #      after last.pt, and last.pt carries the history, so a kill in between can neither lose nor repeat it ----
        if rank == 0:
            record = dict(epoch=epoch + 1, loss=round(loss_sum.item() / steps_per_epoch, 5),
                          train_acc=round(100 * correct.item() / max(seen, 1), 2), lr=lr,
                          seconds=round(time.time() - t_epoch, 2), img_per_s=round(seen / (time.time() - t_epoch), 2))
            history.append(record)
            checkpoint.save(dict(model=state_dict(), optimizer=optimizer.state_dict(), epoch=epoch + 1,
                                 epochs=args.epochs, history=history))
            common.append_line(log_path, json.dumps(record))
        if world > 1:
            torch.distributed.barrier()

    # ---- save ----
    if rank == 0:
        weights = state_dict()
        common.atomic_torch_save(dict(prompts=weights["vpt.prompts"], w_cls=weights["w_cls"], w_llm=weights["w_llm"],
                                      visual={k[len("vpt.visual."):]: v for k, v in weights.items()
                                              if k.startswith("vpt.visual.")},
                                      class_counts=torch.from_numpy(counts), prompt_tokens=args.prompt_tokens,
                                      prompt_depth=model.vpt.depth, scale=args.scale, finetune=args.finetune,
                                      image_size=args.image_size, meta=meta,
                                      training=dict(optimizer_steps=total_steps, lr=base_lr, batch_size=args.batch_size,
                                                    trainable_params=n_train, epochs=args.epochs, selection="last",
                                                    seconds=round(sum(r["seconds"] for r in history), 1))), out)
        checkpoint.finish()
        say(f"trained {args.epochs} epochs ({total_steps} steps of {args.batch_size} images + "
            f"{n_text * args.accum_steps} texts) -> {out}")
    if world > 1:
        common.finish_distributed()
        common.exit_process(0)


if __name__ == "__main__":
    common.run_script(main)
