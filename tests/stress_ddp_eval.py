"""Stress stage 04's torchrun teardown: the 2-process evaluation (gloo on CPU, the default 8 loader workers per
process) N times in a row on the tests' tiny world; every run must exit 0 and leave its results.

    python tests/stress_ddp_eval.py --runs 20          # about 10 s a run on a 2-core CPU

It builds the tiny world and its trained run once (with make) in --dir, then only repeats the evaluation.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, make_args, make_tiny_world  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=20, help="evaluations in a row")
    p.add_argument("--workers", type=int, default=8, help="loader workers per process (stage 04's default)")
    p.add_argument("--dir", default="/tmp/hlc-stress", help="where the tiny world and its run are kept")
    args = p.parse_args(argv)

    base = Path(args.dir)
    world, run = base / "world", base / "run"
    if not (run / "coarse.pt").exists():
        make_tiny_world(world)
        subprocess.run(["make", "-C", str(ROOT), "train"] + make_args(world, run), check=True,
                       stdout=subprocess.DEVNULL)
    failures = []
    for i in range(args.runs):
        out = run / f"stress{i}" / "results.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "04_eval_hlc.py"), "--dataset", "tiny", "--data-root", str(world), "--features",
               str(run / "text_features.pt"), "--coarse", str(run / "coarse.pt"), "--out", str(out), "--model",
               f"{world}/tiny-clip.json", "--pretrained", "none", "--workers", str(args.workers), "--explain", "0"]
        t = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        ok = done.returncode == 0 and out.exists()
        print(f"run {i + 1}/{args.runs}: exit {done.returncode}, results {'written' if out.exists() else 'MISSING'}, "
              f"{time.time() - t:.1f}s", flush=True)
        if not ok:
            failures.append(i + 1)
            print(done.stderr[-3000:], flush=True)
    print(f"{args.runs - len(failures)} of {args.runs} runs passed" + (f"; failed: {failures}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
