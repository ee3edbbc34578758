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

PROVENANCE = ("classnames_digest", "train_split_digest", "text_features_digest", "model_fingerprint")


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
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--resume", action="store_true", help="skip finished phases and continue last.pt (Make: RESUME=1)")


def setup(args, name, recipes):
    """The recipe for this dataset (flags win one value at a time), device, output folder (locked) and seed."""
    recipe = common.apply_recipe(args, recipes)
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
        has_val = "val" in common.dataset_info(args.dataset)["splits"] and \
            common.split_file(args.data_root, args.dataset, "val") is not None
        if has_val and split != "val":
            val = common.read_split(args.data_root, args.dataset, "val", len(classnames))
        else:
            print(f"note: no val split apart from the evaluated '{split}' split: testing the last weights")
            args.select = "last"
    return classnames, text, samples, common.class_counts(samples, len(classnames)), val, split, test


def make_meta(stage, args, classnames, samples, text, model_name):
    """meta of a system's outputs: stage 03's facts, so a resume checks the same inputs by digest."""
    return common.make_meta(stage, args, dataset=args.dataset, num_classes=len(classnames), model=model_name,
                            pretrained=args.pretrained, classnames_digest=common.names_digest(classnames),
                            train_split_digest=common.split_digest(samples, args.data_root),
                            text_features_digest=text["meta"]["digest"],
                            model_fingerprint=text["meta"]["model_fingerprint"])


def train_transform(preprocess_val, scale=(0.08, 1.0), flip=True, jitter=0.0, interpolation="bicubic",
                    randaugment=None, erasing=0.0):
    """A compared system's own training augmentation (its code's crop scale, flips, colour jitter, RandAugment and
    random erasing), at the model's input size and with its normalisation, both taken from open_clip's evaluation
    transform."""
    from torchvision import transforms as T
    size = next(t.size for t in preprocess_val.transforms if isinstance(t, T.CenterCrop))
    normalize = next(t for t in preprocess_val.transforms if isinstance(t, T.Normalize))
    mode = T.InterpolationMode.BICUBIC if interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    steps = [T.RandomResizedCrop(size, scale=scale, interpolation=mode)] + ([T.RandomHorizontalFlip()] if flip else [])
    steps += [T.ColorJitter(jitter, jitter, jitter)] if jitter else []
    steps += [T.RandAugment(num_ops=2, magnitude=randaugment, interpolation=mode)] if randaugment else []
    steps += [T.ToTensor(), normalize]
    steps += [T.RandomErasing(p=erasing, value="random")] if erasing else []
    return T.Compose(steps)


# ---- samplers of the originals ----

def weighted_batches(labels, class_weights, batch_size, num_samples, generator):
    """One epoch of num_samples indices drawn with replacement, image i with probability proportional to
    class_weights[label_i] (1 / n_c: class-balanced; 1 / sqrt(n_c): square-root sampling), cut into batches."""
    labels = torch.as_tensor(labels)
    weights = torch.as_tensor(class_weights, dtype=torch.float64)[labels]
    idx = torch.multinomial(weights, num_samples, replacement=True, generator=generator)
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
    finished phase is kept as DIR/<phase>.pt. With resume, finished phases are loaded instead of trained and the phase
    in progress continues from last.pt. A checkpoint trained with other settings, on other inputs (by digest), or with
    more epochs than now asked is refused, naming what differs."""

    def __init__(self, directory, meta, args, resume):
        self.dir, self.meta, self.args, self.resume = Path(directory), meta, args, resume
        self.log = self.dir / "log.jsonl"
        self.steps = {}  # optimizer steps each phase took (results.json: training)
        if not resume and self.log.exists():
            self.log.unlink()

    def _load(self, path):
        state = common.load_checkpoint(path, "an earlier run of this system")
        common.check_resume_args(state["meta"]["args"], self.args, path)
        common.check_provenance(path, state["meta"], {key: (self.meta[key], f"this run's {key.split('_digest')[0]}")
                                                      for key in PROVENANCE if key in self.meta})
        return state

    @staticmethod
    def _check_epochs(path, state, epochs):
        """A finished phase must have the epochs asked now; a phase in progress may be continued to more, not fewer."""
        done, finished = state.get("epochs", state.get("epoch")), "epochs" in state
        if done > epochs or (finished and done != epochs):
            raise SystemExit(f"{path} holds {state['phase']} trained for {done} epochs, {epochs} are asked now: its "
                             f"weights would be labelled {epochs}. Resume with the same epochs (Make: EPOCHS=...), or "
                             "delete it to train that phase again")

    def finished(self, phase, epochs=None):
        """The saved state of a finished phase ({'modules': {...}, ...}), or None when it must be trained."""
        path = self.dir / f"{phase}.pt"
        if not (self.resume and path.exists()):
            return None
        state = self._load(path)
        if epochs is not None:
            self._check_epochs(path, state, epochs)
        self.steps[phase] = state.get("steps", 0)
        print(f"{phase}: loaded {path}")
        return state

    def run(self, phase, modules, optimizer, epochs, batches_of, loss_of, lr_of, validate=None, clip_grad=None,
            after_backward=None, keep=None, params=None):
        """Train one phase: for each epoch, batches_of(epoch) gives its batches and loss_of(batch) each step's loss;
        lr_of(step, total) the learning rate of every group (scaled by the group's lr_scale); gradients are clipped to
        clip_grad; after_backward() runs between backward and step (GNM restores its weights there). validate(), when
        given, scores the weights on the val split after each epoch, and the best are kept and restored at the end.
        A non-finite loss stops the run; each epoch ends with last.pt and a log line, the phase with DIR/<phase>.pt
        (holding `keep` too)."""
        params = params or [q for group in optimizer.param_groups for q in group["params"]]
        start, step, best = 0, 0, None
        path = self.dir / "last.pt"
        if self.resume and path.exists():
            state = self._load(path)
            if state["phase"] == phase:
                self._check_epochs(path, state, epochs)
                for name, module in modules.items():
                    module.load_state_dict(state["modules"][name])
                optimizer.load_state_dict(state["optimizer"])
                start, step, best = state["epoch"], state["step"], state.get("best")
                print(f"{phase}: resumed from {path} after epoch {start}")
        for epoch in range(start, epochs):
            t, losses, batches = time.time(), [], batches_of(epoch)
            total = step + (epochs - epoch) * len(batches)  # every epoch of a phase has as many batches
            for batch in batches:
                lr = lr_of(step, total)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                loss = loss_of(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if after_backward:
                    after_backward()
                if clip_grad:
                    torch.nn.utils.clip_grad_norm_(params, clip_grad)
                optimizer.step()
                losses.append(loss.detach())
                step += 1
            mean = torch.stack(losses).mean().item()
            if not math.isfinite(mean):
                raise SystemExit(f"{phase}: loss is {mean} in epoch {epoch + 1}; try a lower learning rate, then "
                                 f"--resume (the last good state is {path})")
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
            common.atomic_torch_save(dict(phase=phase, epoch=epoch + 1, step=step, modules=module_states(modules),
                                          optimizer=optimizer.state_dict(), best=best, meta=self.meta), path)
            common.append_line(self.log, json.dumps(record))
        if best is not None:  # the best weights on the val split, as the original keeps them
            for name, module in modules.items():
                module.load_state_dict(best["modules"][name])
            print(f"{phase}: keeping epoch {best['epoch']} of {epochs} (val {best['acc']:.2f})")
        self.steps[phase] = step
        common.atomic_torch_save(dict(phase=phase, epochs=epochs, steps=step, modules=module_states(modules),
                                      best_epoch=best and best["epoch"], meta=self.meta, **(keep or {})),
                                 self.dir / f"{phase}.pt")


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
