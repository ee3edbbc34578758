"""Speed benchmark: how close the kit's training, evaluation and text encoding come to the hardware's limit.

Prints, for one model and batch size: the training step on synthetic tensors (images/s, TFLOP/s counted from the
model's matrix shapes, MFU against the device's dense bf16 peak), the same for evaluation (VPT + plain tower, as
stage 04) and text encoding (sentences/s), end-to-end training throughput with JPEG files decoded from disk
(files it writes first), and peak GPU memory.

    make bench                                   # ViT-B/16, 20 prompts x 12 layers, batch 128 on CUDA
    python bench.py --device cpu                 # a small model and a few steps, so it runs anywhere
    make bench-scale                             # stages 01-04 at iNaturalist's size: peak memory, file size

FLOPs count 2 per multiply-add of every matrix product (patch embedding, attention projections, attention
scores and values, MLP, output projection). A prompt-tuning step runs the forward and the backward through
activations (the frozen weights get no gradient), so it counts as 2 forward passes.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets (without sparsity).
PEAK_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
             "RTX 4090": 165.0, "RTX 3090": 71.0}
TINY = {"embed_dim": 64, "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def transformer_flops(tokens_per_layer, width, mlp_ratio=4.0):
    """Forward FLOPs of pre-norm transformer blocks, one entry of tokens_per_layer per block."""
    d, hidden = width, int(width * mlp_ratio)
    return sum(2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * hidden
               for t in tokens_per_layer)


def vit_flops(width, patch, grid, layers, mlp_ratio, out_dim, prompt_tokens=0, prompt_depth=0):
    """Forward FLOPs of a ViT on one image: patch embedding, the blocks (prompts in the first prompt_depth),
    projection."""
    tokens = [1 + grid + (prompt_tokens if i < prompt_depth else 0) for i in range(layers)]
    return 2 * grid * 3 * patch * patch * width + transformer_flops(tokens, width, mlp_ratio) + 2 * width * out_dim


def visual_flops(visual, prompt_tokens, prompt_depth):
    width = visual.conv1.out_channels
    return vit_flops(width, visual.conv1.kernel_size[0], visual.positional_embedding.shape[0] - 1,
                     len(visual.transformer.resblocks), visual.transformer.resblocks[0].mlp.c_fc.out_features / width,
                     visual.output_dim, prompt_tokens, prompt_depth)


def timed(fn, steps, warmup, device):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def write_jpegs(folder, n, width=500, height=375):
    """ImageNet-like files: the typical 500 x 375 size, smooth shapes plus grain, quality 90 (about 80 KB)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        base = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC), dtype=np.int16)
        img = (img + rng.integers(-20, 20, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)
        lines.append((str(folder / f"{i:05d}.jpg"), i % 10, f"bench:{i}"))
    return lines


def end_to_end(lines, transform, decode, device, batch, steps, workers, train_step):
    """Images/s of training steps fed from JPEG files by the kit's loader (as stage 03), after one batch of
    warm-up; the files are read again in a new order as often as needed."""
    sampler = common.Batches()
    loader, to_device = common.image_loader(lines, transform, decode, device, seed=0, workers=workers,
                                            batch_sampler=sampler)
    done, t, epoch = 0, None, 0
    while done < steps * batch:
        perm = torch.randperm(len(lines), generator=torch.Generator().manual_seed(epoch)).tolist()
        sampler.batches = [[(epoch, j) for j in perm[s:s + batch]] for s in range(0, len(lines) - batch + 1, batch)]
        for batch_ in loader:
            train_step(*to_device(batch_))
            if t is None:  # the first batch pays for worker start-up
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                continue
            done += batch
        epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t)


SCALE_CLIP = {"embed_dim": 512, "quick_gelu": True,  # ViT-B/16's feature width, so the files have their real size
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
              "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
PEAK = ("import resource, runpy, sys; sys.argv = sys.argv[1:]\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "finally:\n    print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)")


def scale_run(args):
    """Stages 01-04 on a synthetic world of iNaturalist 2018's size (8,142 classes, 24,426 evaluation images; a tiny
    CLIP with ViT-B/16's 512-wide features; one training epoch on 2 images per class), each stage timed with its peak
    memory (its own process; the largest loader worker apart), and the size of predictions.npz."""
    import subprocess
    import sys
    from PIL import Image
    root = Path(__file__).resolve().parent
    base = Path(args.scale_dir or tempfile.mkdtemp(prefix="hlc-scale-"))
    world, run, classes, n = base / "world", base / "run", 8142, 24426
    t = time.time()
    if not (world / "test.txt").exists():
        (world / "images").mkdir(parents=True, exist_ok=True)
        val = Path(args.val_list) if args.val_list else None
        given = val is not None and val.exists()
        labels = ([int(line.split()[1]) for line in val.read_text().splitlines() if line.strip()] if given
                  else [i % classes for i in range(n)])
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(world / "images" / f"{i}.png")
        (world / "test.txt").write_text("".join(f"images/{i}.png {y}\n" for i, y in enumerate(labels)))
        (world / "train.txt").write_text("".join(f"images/{(2 * c + k) % n}.png {c}\n" for c in range(classes)
                                                 for k in range(2)))
        names = [f"species number {c}" for c in range(classes)]
        (world / "classnames.txt").write_text("\n".join(names) + "\n")
        (world / "descriptors.json").write_text(json.dumps({nm: [f"feature {k} of {nm}" for k in range(10)]
                                                            for nm in names}))
        (world / "clip.json").write_text(json.dumps(SCALE_CLIP))
        print(f"synthetic world: {classes} classes, {len(labels)} evaluation images"
              f"{' (labels of ' + str(val) + ')' if given else ''} in {time.time() - t:.0f}s", flush=True)
    common_args = ["--model", str(world / "clip.json"), "--pretrained", "none", "--device", "cpu"]
    data = ["--dataset", "scale", "--data-root", str(world)]
    stages = [("01_build_corpus.py", data + ["--descriptors", str(world / "descriptors.json"),
                                            "--out", str(run / "corpus.json")]),
              ("02_cache_descriptors.py", ["--corpus", str(run / "corpus.json"), "--out", str(run / "text_features.pt")]
               + common_args),
              ("03_train_coarse.py", data + common_args + ["--features", str(run / "text_features.pt"), "--epochs", "1",
                                                           "--batch-size", "256", "--workers", str(args.workers),
                                                           "--out", str(run / "coarse.pt")]),
              ("04_eval_hlc.py", data + common_args + ["--features", str(run / "text_features.pt"), "--coarse",
                                                       str(run / "coarse.pt"), "--workers", str(args.workers),
                                                       "--out", str(run / "results.json")])]
    figures = {}
    for script, stage_args in stages:
        if script.startswith("01") and (run / "corpus.json").exists():
            continue
        t = time.time()
        if script.startswith("01"):
            stage_args = [a for a in stage_args if not a.startswith("--model")]
        out = subprocess.run([sys.executable, "-c", PEAK, str(root / script)] + stage_args, cwd=root,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{script} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        own, worker = [int(x) for x in out.stdout.rsplit("PEAK_KB", 1)[1].split()[:2]]
        figures[script] = dict(seconds=round(time.time() - t, 1), peak_gb=round(own / 2**20, 2),
                               largest_worker_gb=round(worker / 2**20, 2))
        f = figures[script]
        print(f"{script:26s} {f['seconds']:7.1f} s   peak memory {f['peak_gb']:6.2f} GB (its largest child process, "
              f"e.g. a loader worker: {f['largest_worker_gb']:.2f} GB)", flush=True)
    size = (run / "predictions.npz").stat().st_size
    figures["predictions_npz_mb"] = round(size / 1e6, 1)
    print(f"predictions.npz: {size / 1e6:.1f} MB ({classes} classes, {n} images, 512-wide features); run in {run}")
    if args.json:
        common.atomic_write_json(args.json, figures)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="open_clip name or config JSON (default: ViT-B-16-quickgelu on CUDA, "
                                               "a small built-in config on CPU)")
    p.add_argument("--batch-size", type=int, default=0, help="images per step (default: 128 on CUDA, 8 on CPU)")
    p.add_argument("--steps", type=int, default=0, help="timed steps (default: 20 on CUDA, 3 on CPU)")
    p.add_argument("--prompt-tokens", type=int, default=20, help="VPT tokens per layer (paper: 20)")
    p.add_argument("--prompt-depth", type=int, default=12, help="layers with prompts (paper: 12)")
    p.add_argument("--image-size", type=int, default=0, help="input size (0: the model's own)")
    p.add_argument("--jpegs", type=int, default=0, help="JPEG files for the end-to-end figure (default: 2048 / 32)")
    p.add_argument("--workers", type=int, default=8, help="data loader workers for the end-to-end figures")
    p.add_argument("--decode", nargs="+", default=list(common.DECODE_MODES), choices=list(common.DECODE_MODES),
                   help="decoding paths to time end to end (stage 03's --decode)")
    p.add_argument("--compile", action="store_true", help="torch.compile the image tower (as stage 03's --compile)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: from the GPU's name)")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    p.add_argument("--scale", action="store_true",
                   help="instead: stages 01-04 at iNaturalist's size, each stage's peak memory and the size of "
                        "predictions.npz (make bench-scale)")
    p.add_argument("--scale-dir", default="", help="--scale: folder for the synthetic world and run (kept)")
    p.add_argument("--val-list", default="", help="--scale: take the labels from this iNaturalist18_val.txt")
    args = p.parse_args(argv)
    common.note_for_memory('BENCH_ARGS="--batch-size 32" needs less')
    if args.scale:
        return scale_run(args)
    with tempfile.TemporaryDirectory(prefix="hlc-bench-") as tmp:  # the JPEG files go with it
        return run_bench(args, Path(tmp))


def run_bench(args, tmp):
    # ---- setup ----
    device = common.pick_device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (128 if cuda else 8)
    steps = args.steps or (20 if cuda else 3)
    warmup = 5 if cuda else 1
    model_name = args.model
    if not model_name:
        model_name = "ViT-B-16-quickgelu" if cuda else str(tmp / "bench-tiny.json")
        if not cuda:
            Path(model_name).write_text(json.dumps(TINY))
    name_gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16.items() if k in name_gpu), 0.0)

    # ---- model (random weights: speed does not depend on them) ----
    torch.manual_seed(0)
    clip, preprocess_train, _, name = common.load_clip(model_name, "none", device, args.image_size)
    vpt = common.PromptedVisual(clip.visual, args.prompt_tokens, args.prompt_depth).to(device)
    size = clip.visual.image_size[0] if isinstance(clip.visual.image_size, tuple) else clip.visual.image_size
    d, classes, m = clip.visual.output_dim, 1000, 10
    w_cls = torch.nn.Parameter(F.normalize(torch.randn(classes, d, device=device), dim=-1))
    w_llm = torch.nn.Parameter(torch.zeros(classes, m, device=device))
    desc = F.normalize(torch.randn(classes, m, d, device=device), dim=-1)
    mask = torch.ones(classes, m, dtype=torch.bool, device=device)
    corpus = F.normalize(torch.randn(20000, d, device=device), dim=-1)
    opt = torch.optim.AdamW([vpt.prompts, w_cls, w_llm], lr=1e-4)
    encode = torch.compile(vpt) if args.compile else vpt
    fwd = visual_flops(clip.visual, args.prompt_tokens, vpt.depth)
    fwd_plain = visual_flops(clip.visual, 0, 0)

    def train_step(images, labels):
        with common.image_autocast(device):
            v = F.normalize(encode(images).float(), dim=-1)
        idx = torch.randint(len(corpus), (len(v),), device=device)
        feats = torch.cat([v, corpus[idx]])
        soft = F.one_hot(torch.cat([labels, idx % classes]), classes).float()
        feats, soft = common.mixup(feats, soft, 0.7, torch.randperm(len(feats), device=device))
        loss = common.soft_cross_entropy(common.cosine_logits(feats, w_cls, 25.0), soft)
        loss = loss + F.cross_entropy(100 * common.descriptor_scores(v, desc, mask, w_llm), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    figures = dict(device=name_gpu, model=name, batch=batch, image_size=size, prompt_tokens=args.prompt_tokens,
                   prompt_depth=vpt.depth, torch=str(torch.__version__), precision=common.effective_precision(device),
                   peak_bf16_tflops=peak or None,
                   gflops_forward_per_image=round(fwd / 1e9, 3))

    def report(key, per_second, flops_per_item):
        tflops = per_second * flops_per_item / 1e12
        figures[key] = dict(per_second=round(per_second, 1), tflops=round(tflops, 3),
                            mfu=round(tflops / peak, 3) if peak else None)

    # ---- training step on synthetic tensors ----
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(classes, (batch,), device=device)
    vpt.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    sec = timed(lambda: train_step(images, labels), steps, warmup, device)
    report("train_step", batch / sec, 2 * fwd)
    figures["train_peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None

    # ---- evaluation: VPT features + plain CLIP features, as stage 04 ----
    vpt.eval()

    @torch.no_grad()
    def eval_step():
        with common.image_autocast(device):
            vpt(images), clip.visual(images)

    report("eval", batch / timed(eval_step, steps, warmup, device), fwd + fwd_plain)

    # ---- text encoding, as stage 02 (under --precision auto) ----
    import open_clip
    tokenizer = open_clip.get_tokenizer(name)
    sentences = [f"a photo of a thing number {i}, which has a long and detailed description." for i in range(batch * 4)]
    tokens = tokenizer(sentences).to(device)
    text_width = clip.transformer.width
    text_flops = transformer_flops([tokens.shape[1]] * len(clip.transformer.resblocks), text_width)

    @torch.no_grad()
    def text_step():
        with common.image_autocast(device):  # stage 02's switch for the text tower
            clip.encode_text(tokens)

    report("text", len(sentences) / timed(text_step, steps, warmup, device), text_flops)

    # ---- end to end: JPEG files decoded and augmented as in stage 03 (each --decode path), then the step ----
    n_jpegs = args.jpegs or (2048 if cuda else 32)
    if n_jpegs < 2 * batch:
        raise SystemExit(f"--jpegs {n_jpegs}: need at least two batches ({2 * batch} files)")
    (tmp / "jpg").mkdir()
    lines = write_jpegs(tmp / "jpg", n_jpegs)
    vpt.train()
    for mode in args.decode:
        rate = end_to_end(lines, preprocess_train, mode, device, batch, steps, args.workers, train_step)
        report(f"train_end_to_end_{mode}", rate, 2 * fwd)
    best = max(args.decode, key=lambda m: figures[f"train_end_to_end_{m}"]["per_second"])
    figures["train_end_to_end"] = dict(figures[f"train_end_to_end_{best}"], decode=best)
    figures["end_to_end_vs_step"] = round(figures["train_end_to_end"]["per_second"] /
                                          figures["train_step"]["per_second"], 3)
    figures["imagenet_lt_epoch_minutes"] = round(115846 / figures["train_end_to_end"]["per_second"] / 60, 2)

    # ---- report ----
    mfu = lambda f: f"MFU {f['mfu']:.1%}" if f["mfu"] is not None else "MFU n/a (no known peak: --peak-tflops)"
    print(f"{name_gpu}, {name} at {size} px, {args.prompt_tokens} prompts x {vpt.depth} layers, batch {batch}, "
          f"torch {figures['torch']}, {figures['precision']}; {figures['gflops_forward_per_image']} GFLOPs forward per "
          "image")
    rows = [("train_step", "training step (synthetic)", "images/s"), ("eval", "evaluation (VPT + plain)", "images/s"),
            ("text", "text encoding", "sentences/s")]
    rows += [(f"train_end_to_end_{m}", f"training from JPEGs, {m}", "images/s") for m in args.decode]
    for key, label, unit in rows:
        f = figures[key]
        print(f"{label:28s} {f['per_second']:10.1f} {unit:12s} {f['tflops']:8.3f} TFLOP/s  {mfu(f)}")
    print(f"end-to-end / synthetic step: {figures['end_to_end_vs_step']:.2f} (best: --decode "
          f"{figures['train_end_to_end']['decode']}, {args.workers} workers); implied ImageNet-LT epoch "
          f"(115,846 images): {figures['imagenet_lt_epoch_minutes']:.1f} min")
    mem = figures["train_peak_memory_gib"]
    print(f"peak GPU memory (training): {f'{mem} GiB' if mem is not None else 'n/a on CPU'}")
    if args.json:
        common.atomic_write_json(args.json, figures)


if __name__ == "__main__":
    common.run_script(main)
