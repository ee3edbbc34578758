"""make tune-toy: each method's learning rate on the toy world, picked on the val split from one shared grid.

Reads   the toy world (DATA_ROOT) and RUN/text_features.pt.
Writes  RUN/tune/<method>-x<factor>/ (one training and its val evaluation per method and factor), RUN/tune/val.md (the
        val table and each method's pick), and prints it.

    python tune_toy.py --run runs/toy --features runs/toy/text_features.pt --dataset toy --data-root data/toy \
        --model data/toy/clip/toy-clip.json --pretrained data/toy/clip/toy-clip.safetensors

Every method, HLC included, trains with its toy recipe (the same number of optimizer steps at batch 32:
docs/systems.md) and its original learning rate(s) times each factor of the grid (--lr-scale: 0.3, 1, 3, 10, 30, 100,
300, 1000, 3000); its headline variant is scored on the val split (10 images per class) with the weights the method is
compared with (the best on val where the original keeps those), and the factor with the best val accuracy is the
method's pick (a tie goes to the smaller factor). A learning rate whose training diverges (a NaN or infinite loss) is
a result of the grid, "diverged", never picked. The picks are written into each script's toy recipe by hand, where the
README's numbers come from; this target reproduces them. A cell made with the same arguments from the same inputs and
code is not trained again, and one interrupted under the same arguments continues, so an interrupted tuning goes on
where it stopped. About 41 min on a 2-core CPU from nothing (54 trainings).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import basics

METHODS = {  # method -> (command, the variant whose val accuracy decides)
    "hlc": (None, "hlc"), "ballad": ("systems.ballad", "ballad"),
    "imbalance_vlm": ("systems.imbalance_vlm", "ivlm_ce_disalign"), "vl_ltr": ("systems.vl_ltr", "vl_ltr_lgr"),
    "lt_dpt": ("systems.lt_dpt", "lt_dpt"), "lift": ("systems.lift", "lift")}


def input_stamps(files):
    """[path, sha1 of its bytes] of each input file: a cell made from other inputs (a rebuilt toy world, an edited
    recipe or split file) is trained again."""
    return [[str(f), basics.file_digest(f)] for f in files if Path(f).is_file()]


def code_of(method):
    """The files whose content makes a method's cell: its script (which holds its recipes) and what it runs on."""
    module, _ = METHODS[method]
    own = ["03_train_coarse.py", "04_eval_hlc.py"] if module is None else [module.replace(".", "/") + ".py",
                                                                           "systems/frame.py"]
    return [str(Path(__file__).parent / f) for f in own + ["common.py", "basics.py"]]


def run_cell(method, factor, folder, base, extra, stamps):
    """Train one method at one factor and score it on the val split; returns its val results.json (reused when the
    same arguments made it before, from the same input files and code). A cell interrupted with the same arguments
    continues (--resume); one left by other arguments starts over (--fresh)."""
    args = base + ["--lr-scale", f"{factor:g}"] + extra
    record, made = folder / "args.json", {"args": args, "inputs": stamps + input_stamps(code_of(method))}
    if (folder / "results.json").exists() and record.exists() and json.loads(record.read_text()) == made:
        return json.loads((folder / "results.json").read_text())
    started = folder / "started.json"
    again = ["--resume"] if started.exists() and json.loads(started.read_text()) == made else ["--fresh"]
    basics.atomic_write_text(started, json.dumps(made))
    py = sys.executable
    module, _ = METHODS[method]
    if module is None:  # HLC: stage 03, then stage 04 on the val split
        steps = [[py, "03_train_coarse.py", *args, *again, "--out", str(folder / "coarse.pt")],
                 [py, "04_eval_hlc.py", *base, "--coarse", str(folder / "coarse.pt"), "--split", "val", "--explain",
                  "0", "--no-report", "--out", str(folder / "results.json")]]
    else:
        steps = [[py, "-m", module, *args, *again, "--split", "val", "--out", str(folder)]]
    for cmd in steps:
        done = subprocess.run(cmd, cwd=Path(__file__).parent, capture_output=True, text=True)
        said = done.stderr + done.stdout
        if done.returncode and any(f"loss is {x}" in said for x in ("nan", "inf", "-inf")):  # diverged: a result
            basics.atomic_write_json(folder / "results.json", dict(diverged=True))
            break
        if done.returncode:
            raise SystemExit(f"{method} x{factor:g} failed:\n{done.stderr[-2000:]}")
    basics.atomic_write_text(record, json.dumps(made))
    return json.loads((folder / "results.json").read_text())


def val_score(res, method):
    """The headline variant's val accuracy of a cell; a training that diverged (a NaN or infinite loss) scores
    nothing."""
    return None if res.get("diverged") else res["variants"][METHODS[method][1]]["overall"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run directory (RUN); the cells go to RUN/tune/")
    p.add_argument("--features", required=True, help="text_features.pt from stage 02")
    p.add_argument("--dataset", default="toy", help="the dataset whose recipe is tuned (the toy world)")
    p.add_argument("--data-root", required=True, help="dataset root")
    p.add_argument("--model", required=True, help="open_clip model name or config JSON")
    p.add_argument("--pretrained", required=True, help="weights")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS), help="methods to tune")
    p.add_argument("--grid", nargs="+", type=float, default=[0.3, 1, 3, 10, 30, 100, 300, 1000, 3000],
                   help="factors of each original lr")
    p.add_argument("--epochs", type=int, default=0, help="override every recipe's epochs (tests)")
    p.add_argument("--batch-size", type=int, default=0, help="override every recipe's batch (tests)")
    p.add_argument("--seed", type=basics.seed_value, default=0, help="random seed")
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto")
    p.add_argument("--workers", type=int, default=2, help="data loader workers")
    args = p.parse_args(argv)

    t0 = time.time()
    base = ["--dataset", args.dataset, "--data-root", args.data_root, "--features", args.features, "--model",
            args.model, "--pretrained", args.pretrained, "--seed", str(args.seed), "--device", args.device,
            "--workers", str(args.workers)]
    extra = (["--epochs", str(args.epochs)] if args.epochs else []) + \
        (["--batch-size", str(args.batch_size)] if args.batch_size else [])
    stamps = input_stamps([args.features, args.pretrained, args.model] + [str(Path(args.data_root) / f) for f in (
        "train.txt", "val.txt", "classnames.txt")])
    table = {}
    for method in args.methods:
        for factor in args.grid:
            folder = Path(args.run) / "tune" / f"{method}-x{factor:g}"
            t = time.time()
            res = run_cell(method, factor, folder, base, extra, stamps)
            table.setdefault(method, {})[factor] = res
            score = val_score(res, method)
            print(f"{method} x{factor:g}: val " + ("diverged" if score is None else f"{score:.2f}")
                  + f" ({time.time() - t:.0f}s)", flush=True)
    head = "| method (variant) | " + " | ".join(f"x{f:g}" for f in args.grid) + " | pick | steps | lr picked |"
    lines = [f"# Learning rate on the val split of {args.data_root} (original lr x factor)", "", head,
             "|" + " --- |" * (len(args.grid) + 4)]
    for method, cells in table.items():
        variant = METHODS[method][1]
        scores = {f: val_score(r, method) for f, r in cells.items()}
        pick = max(args.grid, key=lambda f: (scores[f] is not None, scores[f] or 0, -f))  # best, then smaller factor
        training = cells[pick].get("training") or {}
        lines.append(f"| {method} ({variant}) | " + " | ".join("diverged" if scores[f] is None else f"{scores[f]:.2f}"
                                                                for f in args.grid)
                     + f" | x{pick:g} | {training.get('optimizer_steps', '-')} | {training.get('lr', '-')} |")
    text = "\n".join(lines) + f"\n\n{len(args.methods) * len(args.grid)} trainings in {time.time() - t0:.0f}s.\n"
    basics.atomic_write_text(Path(args.run) / "tune" / "val.md", text)
    print(text)


if __name__ == "__main__":
    basics.run_script(main)
