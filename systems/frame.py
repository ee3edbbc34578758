"""What the compared systems' scripts share and the numbered stages do not: the run flags, set-up and data, the samplers
of the originals, phased training with checkpoints, resume and model selection on the val split, and the results files.

Each system's recipe, losses and heads stay in its own script; what it shares with HLC (loaders, CLIP, VPT, metrics,
atomic writes, provenance) comes from common.py.
"""
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import common

# ---- command line, set-up, data ----

def add_io_args(parser, features, model_note="must match"):
    """The inputs and output every compared system names first: dataset, its root, stage 02's text features (what the
    system takes from them: `features`), the folder to write, and the CLIP (`model_note`: what its paper used)."""
    p = parser
    p.add_argument("--dataset", required=True, help="imagenet_lt, places_lt, inat2018, cifar100_lt, toy, or any name "
                                                    "(generic layout)")
    p.add_argument("--data-root", required=True, help="dataset root")
    p.add_argument("--features", required=True, help=f"text_features.pt from stage 02 ({features})")
    p.add_argument("--out", required=True, help="folder to write (results.json, predictions.npz, checkpoints)")
    p.add_argument("--model", default="ViT-B-16-quickgelu", help=f"open_clip model name or config JSON ({model_note})")
    p.add_argument("--pretrained", default="openai", help="hub tag, local file, or none (must match)")


def add_run_args(parser, decode_modes=None, selection="last"):
    """The flags every compared system takes after its own. decode_modes=None: PIL only (a recipe whose training
    augmentation cannot move to the device). `selection`: the original's rule for the weights it tests."""
    p = parser
    p.add_argument("--split", default="", help="split to evaluate (default: test; val for inat2018)")
    p.add_argument("--shot-rule", choices=sorted(common.SHOT_RULES), default="lift", help="many/medium/few rule")
    p.add_argument("--select", choices=["best", "last"], default=selection,
                   help=f"weights to test: best on the val split, or the last (the original: {selection}); with no "
                        "val split apart from the evaluated one, the last")
    p.add_argument("--lr-scale", type=float, help="multiplies every learning rate of the recipe (make tune-toy's grid)")
    p.add_argument("--workers", type=int, default=8, help="data loader worker processes")
    if decode_modes:
        p.add_argument("--decode", choices=sorted(decode_modes), default="pil", help="see stage 03's --decode")
    else:
        p.add_argument("--decode", choices=["pil"], default="pil", help="its training augmentation needs PIL decoding")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto")
    p.add_argument("--seed", type=common.seed_value, default=0, help="random seed")
    p.add_argument("--resume", action="store_true", help="skip finished phases and continue the interrupted one in "
                                                              "last.pt (Make: RESUME=1)")
    p.add_argument("--fresh", action="store_true", help="remove an interrupted run's last.pt and start over (Make: "
                                                         "FRESH=1); without this or --resume, a last.pt stops the run")


def setup(args, name, recipes):
    """The recipe for this dataset (flags win one value at a time), device, output folder (locked) and seed."""
    recipe = common.apply_recipe(args, recipes)
    # A flag a system lacks is skipped. One phase's epochs may be 0 (the phase left out, as an ablation); --epochs,
    # which sets them all, may not.
    common.refuse_out_of_range(
        args, least=[("--epochs", 1), ("--iterations", 1), ("--batch-size", 1), ("--accum-steps", 1), ("--workers", 0),
                     *((f"--{flag}", 0) for flag in ("epochs-a", "epochs-b", "epochs-cvlp", "epochs-lgr", "drw-epochs",
                                                     "epoch-steps", "warmup", "warmup-epochs", "weight-decay",
                                                     "momentum", "mixup", "cutmix", "smoothing", "text-lr",
                                                     "min-lr-cvlp", "tte-expand", "adapter-dim"))],
        above=[(f"--{flag}", 0) for flag in ("lr", "lr-a", "lr-b", "lr-full", "lr-lgr", "lr-scale", "crop-scale",
                                             "crop-min", "scale")])
    device = common.pick_device(args.device)
    out = Path(args.out)
    common.hold_run_lock(out, f"systems.{name} -> {out}")
    torch.manual_seed(args.seed)
    print(f"{name}: recipe {recipe!r}" + ("" if recipe == args.dataset else f" (no recipe of its own for "
                                                                          f"{args.dataset})"))
    return device, out


def load_data(args):
    """Class names, the stage-02 text features checked against them, the training list with its class counts, the val
    list for model selection (None when there is no val split apart from the evaluated one) and the evaluation split's
    name and list."""
    classnames = common.class_names(args.dataset, args.data_root)
    text = common.load_text_features(args.features, classnames, args.data_root, args.model, args.pretrained)
    samples = common.read_split(args.data_root, args.dataset, "train", len(classnames))
    split = args.split or common.dataset_info(args.dataset)["eval_split"]
    test = common.read_split(args.data_root, args.dataset, split, len(classnames))
    common.check_overlap(samples, test, split)
    val = None
    if args.select == "best":
        info = common.dataset_info(args.dataset)
        has_val = "val" in info["splits"] and common.split_file(args.data_root, args.dataset, "val") is not None
        if has_val and split != "val":
            val = common.read_split(args.data_root, args.dataset, "val", len(classnames))
        elif has_val and info["eval_split"] != "val":  # scored on val by choice (make tune-toy): the weights are the
            val = test                                  # ones a test run keeps, the best on val
            print("note: evaluated on the val split, so the best weights on it are the ones scored (as tuning on val "
                  "compares them)")
        else:
            print(f"note: no val split apart from the evaluated '{split}' split: testing the last weights")
            args.select = "last"
    return classnames, text, samples, common.class_counts(samples, len(classnames)), val, split, test


def make_meta(stage, args, classnames, samples, text, model_name, split, test):
    """meta of a system's outputs: what it was trained from (common.training_facts, checked on resume) and what it was
    evaluated on (make_tables puts side by side only rows of the same split, shot rule and inputs)."""
    return common.make_meta(stage, args, dataset=args.dataset, num_classes=len(classnames), model=model_name,
                            pretrained=args.pretrained, split=split, shot_rule=args.shot_rule,
                            eval_split_digest=common.split_digest(test, args.data_root),
                            **common.training_facts(classnames, samples, args.data_root, text))


NORMALIZE = {  # input normalisation (mean, std) a system's code uses, when it is not CLIP's own
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inat": ((0.466, 0.471, 0.380), (0.195, 0.194, 0.192)),  # Imbalance-VLM's iNaturalist statistics
}


def normalize_of(preprocess_val, name="clip"):
    """torchvision's Normalize: CLIP's own (taken from open_clip's evaluation transform), or one of NORMALIZE."""
    from torchvision import transforms as T
    if name == "clip":
        return next(t for t in preprocess_val.transforms if isinstance(t, T.Normalize))
    return T.Normalize(*NORMALIZE[name])


def eval_transform(preprocess_val, normalize="clip"):
    """open_clip's evaluation transform (resize, centre crop) with another input normalisation when asked."""
    from torchvision import transforms as T
    if normalize == "clip":
        return preprocess_val
    return T.Compose([normalize_of(preprocess_val, normalize) if isinstance(t, T.Normalize) else t
                      for t in preprocess_val.transforms])


def train_transform(preprocess_val, scale=(0.08, 1.0), flip=True, jitter=0.0, interpolation="bicubic",
                    randaugment=None, erasing=0.0, normalize="clip"):
    """A compared system's own training augmentation (its code's crop scale, flips, colour jitter, RandAugment and
    random erasing), at the model's input size (taken from open_clip's evaluation transform) and with its code's input
    normalisation (CLIP's unless `normalize` names another)."""
    from torchvision import transforms as T
    size = next(t.size for t in preprocess_val.transforms if isinstance(t, T.CenterCrop))
    mode = T.InterpolationMode.BICUBIC if interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    steps = [T.RandomResizedCrop(size, scale=scale, interpolation=mode)] + ([T.RandomHorizontalFlip()] if flip else [])
    steps += [T.ColorJitter(jitter, jitter, jitter)] if jitter else []
    steps += [T.RandAugment(num_ops=2, magnitude=randaugment, interpolation=mode)] if randaugment else []
    steps += [T.ToTensor(), normalize_of(preprocess_val, normalize)]
    steps += [T.RandomErasing(p=erasing, value="random")] if erasing else []
    return T.Compose(steps)


# ---- samplers of the originals ----

def weighted_batches(labels, class_weights, batch_size, num_samples, generator, replacement=True):
    """One epoch of num_samples indices, image i drawn with probability proportional to class_weights[label_i] (1 / n_c:
    class-balanced; 1 / sqrt(n_c): square-root sampling), cut into batches. replacement=False draws as Imbalance-VLM's
    sampler does (torch.multinomial without replacement): weighted permutations of every image, as many whole ones as
    num_samples holds and the start of one more, so each image comes once per permutation and the tail is only moved
    forward, not repeated."""
    labels = torch.as_tensor(labels)
    weights = torch.as_tensor(class_weights, dtype=torch.float64)[labels]
    if replacement:
        idx = torch.multinomial(weights, num_samples, replacement=True, generator=generator)
    else:
        n = len(labels)
        parts = [torch.multinomial(weights, n, replacement=False, generator=generator)
                 for _ in range(num_samples // n + bool(num_samples % n))]
        idx = torch.cat(parts)[:num_samples]
    return [idx[i:i + batch_size] for i in range(0, num_samples - batch_size + 1, batch_size)]


def shuffled_batches(n, batch_size, num_batches, seed, epoch):
    """One epoch of instance-balanced batches: a permutation of the n images seeded by (seed, epoch), cut into
    num_batches full batches (the rest dropped), as (epoch, index) pairs for the epoch-seeded loader."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return [[(epoch, j) for j in perm[i * batch_size:(i + 1) * batch_size].tolist()] for i in range(num_batches)]


def class_aware_batches(labels, num_classes, per_class, batch_size, num_batches, generator):
    """BALLAD's (and OLTR's) class-aware sampling: classes are visited in shuffled rounds, and each visit takes
    per_class images of that class (cycling through a shuffled list of them); num_batches batches of batch_size."""
    labels = torch.as_tensor(labels)
    members = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    present = [c for c in range(num_classes) if len(members[c])]
    total = num_batches * batch_size
    cursor = {c: len(members[c]) for c in present}  # exhausted: reshuffle on first use
    order = {c: members[c] for c in present}
    idx, rounds = [], []
    while len(idx) < total:
        if not rounds:
            rounds = [present[i] for i in torch.randperm(len(present), generator=generator).tolist()]
        c = rounds.pop()
        for _ in range(per_class):
            if cursor[c] == len(order[c]):
                order[c], cursor[c] = members[c][torch.randperm(len(members[c]), generator=generator)], 0
            idx.append(int(order[c][cursor[c]]))
            cursor[c] += 1
    idx = torch.tensor(idx[:total])
    return [idx[i:i + batch_size] for i in range(0, total, batch_size)]


# ---- phased training: checkpoints, resume, the best weights on the val split ----

def module_states(modules):
    return {name: {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            for name, module in modules.items()}


class Phases:
    """Checkpoints of a system that trains in phases (BALLAD: A then B; Imbalance-VLM: one model per loss, then its
    second stages). After every epoch the phase in progress is saved to DIR/last.pt (then its log.jsonl line); a
    finished phase is kept as DIR/<phase>.pt; last.pt goes when the system's results are written (done()). A last.pt
    found at the start is an interrupted run (common.Checkpoint): it stops the run unless --resume continues it or
    --fresh starts over. With resume, finished phases are loaded instead of trained and the phase in progress continues.
    A checkpoint trained with other settings, other epochs or on other inputs (by digest) is refused, naming what
    differs; a flag the checkpoint's run did not have yet counts as unchanged at its default in `defaults`
    (common.parser_defaults)."""

    def __init__(self, directory, meta, args, resume, defaults=None):
        self.dir, self.meta, self.args, self.resume, self.defaults = Path(directory), meta, args, resume, defaults
        self.log = self.dir / "log.jsonl"
        self.steps = {}  # optimizer steps each phase took (results.json: training)
        self.checkpoint = common.Checkpoint(self.dir / "last.pt", meta, args, defaults=defaults)
        self.in_progress = self.checkpoint.start()
        if self.in_progress is None and not resume:
            self.log.unlink(missing_ok=True)

    @staticmethod
    def _check_epochs(path, state, epochs):
        """A saved phase (finished or in progress) must follow the schedule of the epochs asked now."""
        done = state.get("epochs", state.get("epoch"))
        if done != epochs:
            raise SystemExit(f"{path} holds {state['phase']} on a schedule of {done} epochs, {epochs} are asked now: "
                             "its weights would be labelled with a schedule they did not follow. Resume with the same "
                             "epochs (Make: EPOCHS=...), or start over (FRESH=1)")

    def finished(self, phase, epochs=None):
        """The saved state of a finished phase ({'modules': {...}, ...}), or None when it must be trained."""
        path = self.dir / f"{phase}.pt"
        if not (self.resume and path.exists()):
            return None
        state = common.load_checkpoint(path, "an earlier run of this system")
        common.check_resume_args(state["meta"]["args"], self.args, path, defaults=self.defaults)
        common.check_training_facts(path, state["meta"], self.meta)
        if epochs is not None:
            self._check_epochs(path, state, epochs)
        self.steps[phase] = state.get("steps", 0)
        print(f"{phase}: loaded {path}")
        return state

    def run(self, phase, modules, optimizer, epochs, batches_of, loss_of, lr_of, validate=None, clip_grad=None,
            after_backward=None, keep=None, params=None, accum=1):
        """Train one phase: for each epoch, batches_of(epoch) gives its batches and loss_of(batch) each one's loss;
        lr_of(step, total) the learning rate of every group (scaled by the group's lr_scale). With accum > 1 an
        optimizer step sums the gradients of `accum` consecutive batches, each loss divided by accum (one step of
        accum x the batch). Gradients are clipped to clip_grad when given; after_backward() runs between backward and
        step (GNM restores its weights there). validate(), when given, scores the weights on the val split after each
        epoch, and the best are kept and restored at the end. A non-finite loss stops the run; each epoch ends with
        last.pt and a log line, the phase with DIR/<phase>.pt (holding `keep` too)."""
        params = params or [q for group in optimizer.param_groups for q in group["params"]]
        start, step, best = 0, 0, None
        state = self.in_progress
        if state is not None and state["phase"] == phase:
            self._check_epochs(self.checkpoint.path, state, epochs)
            for name, module in modules.items():
                module.load_state_dict(state["modules"][name])
            optimizer.load_state_dict(state["optimizer"])
            start, step, best = state["epoch"], state["step"], state.get("best")
            print(f"{phase}: resumed after epoch {start}")
        for epoch in range(start, epochs):
            t, losses, batches = time.time(), [], batches_of(epoch)
            per_epoch = len(batches) // accum
            total = step + (epochs - epoch) * per_epoch  # every epoch of a phase has as many steps
            micro = iter(batches)
            for _ in range(per_epoch):
                lr = lr_of(step, total)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                optimizer.zero_grad(set_to_none=True)
                loss = 0.0
                for _ in range(accum):
                    part = loss_of(next(micro)) / accum
                    part.backward()
                    loss = loss + part.detach()
                if after_backward:
                    after_backward()
                if clip_grad:
                    torch.nn.utils.clip_grad_norm_(params, clip_grad)
                optimizer.step()
                losses.append(loss)
                step += 1
            mean = torch.stack(losses).mean().item()
            if not math.isfinite(mean):
                raise SystemExit(f"{phase}: loss is {mean} in epoch {epoch + 1}; try a lower learning rate, then "
                                 f"--resume (the last good state is {self.checkpoint.path})")
            record = dict(phase=phase, epoch=epoch + 1, steps=step, loss=round(mean, 5), lr=lr)
            if validate is not None:
                acc = validate()
                record["val_acc"] = round(acc, 2)
                if best is None or acc > best["acc"]:
                    best = dict(acc=acc, epoch=epoch + 1, modules=module_states(modules))
            record["seconds"] = round(time.time() - t, 2)
            print(f"{phase} epoch {epoch + 1}/{epochs} loss {mean:.4f} lr {lr:.2e}"
                  + (f" val {record['val_acc']:.2f}" if "val_acc" in record else "") + f" {record['seconds']:.1f}s",
                  flush=True)
            self.checkpoint.save(dict(phase=phase, epoch=epoch + 1, epochs=epochs, step=step,
                                      modules=module_states(modules), optimizer=optimizer.state_dict(), best=best))
            common.append_line(self.log, json.dumps(record))
        if best is not None:  # the best weights on the val split, as the original keeps them
            for name, module in modules.items():
                module.load_state_dict(best["modules"][name])
            print(f"{phase}: keeping epoch {best['epoch']} of {epochs} (val {best['acc']:.2f})")
        self.steps[phase] = step
        common.atomic_torch_save(dict(phase=phase, epochs=epochs, steps=step, modules=module_states(modules),
                                      best_epoch=best and best["epoch"], meta=self.meta, **(keep or {})),
                                 self.dir / f"{phase}.pt")

    def done(self):
        """The system's results are written: the interrupted-run checkpoint goes."""
        self.checkpoint.finish()


def accuracy(logits_of, feats, labels, batch_size=1024):
    """Top-1 accuracy in percent of logits_of(features) over features held in memory."""
    correct = 0
    with torch.no_grad():
        for lo in range(0, len(feats), batch_size):
            correct += int((logits_of(feats[lo:lo + batch_size]).argmax(1) == labels[lo:lo + batch_size]).sum())
    return 100.0 * correct / max(len(feats), 1)


def trainable(*modules):
    return sum(q.numel() for m in modules for q in m.parameters() if q.requires_grad)


# ---- results ----

def write_results(out_dir, system, preds, labels, counts, shot_rule, meta, titles=None, training=None, arrays=None):
    """A compared system's results.json (stage 04's shape: variants, shot_counts, shot_rule, meta, and `training`:
    optimizer steps, learning rate, trainable parameters, selection rule), results.md and predictions.npz (labels,
    every variant's predictions, the class counts and shot rule, and whatever else the script adds)."""
    out_dir = Path(out_dir)
    grouping = common.group_counts(meta["dataset"], counts)
    variants = {name: common.accuracy_report(pred, labels, grouping, shot_rule) for name, pred in preds.items()}
    results = dict(system=system, dataset=meta["dataset"], num_test=len(labels), variants=variants,
                   labels=titles or {}, shot_counts=common.shot_counts(grouping, shot_rule), shot_rule=shot_rule,
                   training=training or {}, meta=meta)
    common.atomic_savez(out_dir / "predictions.npz", labels=np.asarray(labels, dtype=np.int64),
                        class_counts=np.asarray(counts, dtype=np.int64), group_counts=grouping.astype(np.int64),
                        shot_rule=np.str_(shot_rule),
                        **{f"pred_{n}": np.asarray(p, dtype=np.int64) for n, p in preds.items()}, **(arrays or {}))
    fmt = lambda x: "-" if x is None else f"{x:.2f}"
    lines = [f"# {system}: {meta['dataset']} ({len(labels)} test images, shot rule {shot_rule})", "",
             "| variant | many | medium | few | overall |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {fmt(r['many'])} | {fmt(r['medium'])} | {fmt(r['few'])} | {fmt(r['overall'])} |"
              for name, r in variants.items()]
    if training:
        lines += ["", "Training: " + ", ".join(f"{k} {v}" for k, v in training.items()) + "."]
    common.atomic_write_text(out_dir / "results.md", "\n".join(lines) + "\n")
    common.atomic_write_json(out_dir / "results.json", results)
    return results
