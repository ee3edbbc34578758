"""Stage 00's companion: pretrain the toy world's tiny CLIP on its catalogue, once. Its weights are committed
(toy_clip/), so `make all` pretrains nothing; this script is how they were made, and `make toy-clip` makes them again.

Reads   nothing (the catalogue is drawn from --seed: toyworld.py's colours, patterns and captions).
Writes  OUT/toy-clip.json (the open_clip model config), OUT/toy-clip.safetensors (the weights, compact: half
        precision, and only the token-embedding rows the catalogue's captions use; toyworld.expand_clip rebuilds the
        rest, with numpy alone) and OUT/toy-clip.sha256 (the weights file's digest, checked by stage 00 before it uses
        them). While it runs, OUT/last.pt every 200 steps: --resume continues an interrupted run from it, to the
        same bytes as a run never interrupted; it is removed at the end.

    python 00_pretrain_toy_clip.py --out toy_clip          # make toy-clip (writes runs/toy-clip/ and compares)

The catalogue is the tiny CLIP's web: 10 colours x 9 patterns of tile (the task's 6 x 6 among them), each tile
filling most of its picture, half in daylight and half as web photos (--web-share, toyworld.WebCamera) in every
light, colour balance and sensor noise, as a real CLIP has seen photos taken every way; the captions are in plain
words ("a red striped tile.", "a tile with red lines running across.", "a tile in a warm colour."). The model is a
4-layer ViT of width 64 on 32 px pictures (16 patches of 8 px) and a 3-layer text tower, meeting in a 128-wide space,
trained contrastively, a caption fitting every picture whose attributes it names. 2,500 steps of 256 pairs (10 to 18
min on a 2-core CPU) name all 90 colour x pattern kinds on new catalogue pictures; the compact weights are 0.8 MB.
Run again (`make toy-clip`, same torch, same --threads, the same kind of CPU), it writes the committed file byte for
byte: the same sha256 (the slow tests check it on a tiny budget; docs/toy-world.md says when it was checked at full
length, and how far apart the weights came out on another processor generation).
"""
import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
import toyworld


def render_bank(per_class, rng, web_share):
    """(images (N, 3, 32, 32) uint8, class index per image, [(colour, pattern)]): of every kind's pictures, every
    (1 / web_share)-th is a web photo (toyworld.WebCamera; 0.5: every second), the others in daylight"""
    classes = [(c, p) for c in toyworld.COLOURS for p in toyworld.PATTERNS]
    web, every = toyworld.WebCamera(), round(1 / web_share) if web_share else 0  # 0.5: every second picture
    images = [np.asarray(toyworld.render(c, p, rng, camera=web if every and i % every == every - 1 else None))
              for c, p in classes for i in range(per_class)]
    bank = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return bank, torch.arange(len(classes)).repeat_interleave(per_class), classes


def compare(new, committed):
    """Say whether two compact weights files are the same, and if not by how much their arrays differ."""
    (a, _), (b, _) = toyworld.read_clip(new), toyworld.read_clip(committed)
    same = toyworld.clip_digest(new) == toyworld.clip_digest(committed)
    gap = lambda k: float(np.abs(a[k].astype(np.float32) - b[k].astype(np.float32)).max()) \
        if k in b and a[k].shape == b[k].shape else float("inf")
    diff = max(gap(k) for k in a if k != "compact.token_ids")
    print(f"{new} against {committed}: " + ("the same bytes (sha256 " + toyworld.clip_digest(new)[:16] + ")" if same
          else f"different files; largest difference of a weight {diff:.3g}"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="toy_clip", help="folder to write the config, the weights and their digest into")
    p.add_argument("--steps", type=int, default=2500, help="contrastive training steps")
    p.add_argument("--batch-size", type=int, default=256, help="pictures per step, each with one fitting caption")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (warm-up, then cosine)")
    p.add_argument("--bank-per-class", type=int, default=160, help="catalogue pictures drawn per colour x pattern")
    p.add_argument("--web-share", type=float, default=0.5, choices=(0.0, 0.25, 0.5, 1.0),
                   help="share of the catalogue photographed as the web does, in varied light, colour balance and "
                        "noise (toyworld.WebCamera); 0: all daylight, as the toy CLIP before it")
    p.add_argument("--logit-scale", type=float, default=0.0,
                   help="fix CLIP's logit scale (inverse temperature) at this value, as real CLIP ends its training at "
                        "its clamp of 100; 0 learns it from open_clip's start (1 / 0.07, clamped at 100), as the "
                        "committed weights were made (they ended at 26.8)")
    p.add_argument("--seed", type=common.seed_value, default=0, help="everything follows from this seed")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the weights repeat bit for bit with the same "
                                                          "count on the same kind of CPU)")
    p.add_argument("--checkpoint-every", type=int, default=200,
                   help="steps between writes of OUT/last.pt, from which an interrupted run continues (--resume)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in OUT/last.pt (Make: RESUME=1)")
    p.add_argument("--fresh", action="store_true", help="remove OUT/last.pt and start over (Make: FRESH=1)")
    p.add_argument("--compare", nargs=2, metavar=("NEW", "COMMITTED"),
                   help="instead of training: compare two weights files (digest, largest difference) and stop")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not 0 <= args.logit_scale <= 100:
        p.error(f"--logit-scale {args.logit_scale:g}: give 0 (learn it) or a value in (0, 100], where the loss "
                "clamps it")
    if args.checkpoint_every < 1:
        p.error(f"--checkpoint-every {args.checkpoint_every}: give 1 or more")

    # ---- setup ----
    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "toy-clip.json"
    common.atomic_write_text(config, json.dumps(toyworld.CLIP_CONFIG, indent=1) + "\n")

    # ---- data: the catalogue's pictures and captions ----
    print(f"drawing {len(toyworld.COLOURS) * len(toyworld.PATTERNS) * args.bank_per_class} catalogue pictures ...",
          flush=True)
    bank, bank_class, classes = render_bank(args.bank_per_class, rng, args.web_share)
    caps = toyworld.captions()
    open_clip = common.import_open_clip()
    model, _, _, name = common.load_clip(str(config), "none")
    tokenizer = open_clip.get_tokenizer(name)
    tokens = tokenizer([c for c, _, _ in caps])
    fits = torch.tensor([[toyworld.fits(cc, cp, c, p) for _, cc, cp in caps] for c, p in classes])
    mean = torch.tensor(toyworld.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(toyworld.CLIP_STD).view(1, 3, 1, 1)
    print(f"{len(caps)} captions, {len(bank)} pictures in {time.time() - t0:.0f}s", flush=True)

    # ---- model and loop ----
    model.train().requires_grad_(True)
    if args.logit_scale:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(args.logit_scale))
        model.logit_scale.requires_grad_(False)
    decay = [q for n, q in model.named_parameters() if q.ndim >= 2 and "embedding" not in n]
    rest = [q for n, q in model.named_parameters() if not (q.ndim >= 2 and "embedding" not in n) and q.requires_grad]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=rest, weight_decay=0.0)], lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    # an interrupted run continues from its last checkpoint to the same bytes: model, optimizer and the draws' state
    checkpoint = common.Checkpoint(out / "last.pt", common.make_meta("00_pretrain_toy_clip", args), args,
                                   free={"out", "resume", "fresh", "checkpoint_every", "compare"}, facts=False)
    state, first, losses = checkpoint.start(), 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        first, losses = state["epoch"], list(state["losses"])
    warmup = max(1, args.steps // 20)
    t1 = time.time()
    for step in range(first, args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(bank), (args.batch_size,), generator=gen)
        cls = bank_class[idx]
        choice = torch.multinomial(fits[cls].float(), 1, generator=gen).squeeze(1)  # one fitting caption per picture
        images = bank[idx].float() / 255
        flip = torch.rand(len(idx), generator=gen) < 0.5  # a mirrored tile is the same tile
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
        img = F.normalize(model.encode_image((images - mean) / std), dim=-1)
        uniq, where = torch.unique(choice, return_inverse=True)  # each drawn caption through the text tower once
        txt = F.normalize(model.encode_text(tokens[uniq]), dim=-1)[where]
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        pos = fits[cls][:, choice].float()  # (B, B): caption j fits picture i
        loss = 0.5 * (-(pos / pos.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
                      - (pos.T / pos.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            checkpoint.save(dict(epoch=step + 1, epochs=args.steps, unit="step", model=model.state_dict(),
                                 optimizer=opt.state_dict(), generator=gen.get_state(), losses=losses))
        if (step + 1) % 200 == 0 or step + 1 == args.steps:
            rate = (step + 1 - first) * args.batch_size / (time.time() - t1)
            print(f"step {step + 1}/{args.steps} loss {np.mean(losses[-200:]):.3f} lr {lr:.1e} "
                  f"scale {model.logit_scale.exp().item():.1f} {rate:.0f} pairs/s "
                  f"eta {(args.steps - step - 1) * args.batch_size / rate / 60:.1f} min", flush=True)
    model.eval().requires_grad_(False)

    # ---- save: compact weights and their digest ----
    path = out / "toy-clip.safetensors"
    data = toyworld.safetensors_bytes(*toyworld.compact_state(model.state_dict(), torch.unique(tokens)))
    common.write_if_changed(path, data)
    digest = hashlib.sha256(data).hexdigest()
    common.atomic_write_text(out / "toy-clip.sha256", f"{digest}  toy-clip.safetensors\n")
    checkpoint.finish()
    print(f"tiny CLIP: {args.steps} steps in {(time.time() - t0) / 60:.1f} min, "
          f"final loss {np.mean(losses[-200:]):.3f}, {path.stat().st_size / 1e6:.2f} MB, sha256 {digest[:16]} -> {out}")


if __name__ == "__main__":
    common.run_script(main)
