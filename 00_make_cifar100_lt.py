"""Stage 00 for CIFAR-100-LT: torchvision's CIFAR-100 as a long-tailed benchmark in the kit's generic layout
(DATASET=cifar100_lt only).

Reads   ROOT/cifar-100-python/ (torchvision's on-disk format: train, test, meta), downloaded there by torchvision
        first if it is missing (on a machine with internet access).
Writes  ROOT/images/{train,test}/NNNNN.png (once for every imbalance ratio), ROOT/irIR/train.txt (the long-tailed
        training split), ROOT/irIR/test.txt (the balanced 10,000-image test set), ROOT/irIR/classnames.txt (the
        dataset's fine label names, '_' made a space) and ROOT/irIR/.complete last.

    python 00_make_cifar100_lt.py --root data/cifar100_lt --ir 100        # make data DATASET=cifar100_lt IR=100

The training split is LDAM's (Cao et al. 2019), as LIFT and every CIFAR-100-LT paper build it: class c keeps
int(n_max * (1 / IR)^(c / 99)) of its images, n_max = 500 (the training set's images per class), chosen by NumPy's
global generator seeded with 0 shuffling each class's indices in class order (LIFT's datasets/cifar100.py). For
IR = 100: 10,847 images, 500 down to 5 per class. The shot groups of IR 50 and 10 are those of IR 100 (basics.py,
DATASETS), as LIFT's trainer defines them, so the groups name the same classes at every ratio. No val split (LIFT has
none): methods that pick weights on val test their last weights here. About 15 s on a 2-core CPU for the images.
"""
import argparse
import json
import pickle
import time
from pathlib import Path

import numpy as np

import basics


def long_tail_counts(n_max, ratio, num_classes=100):
    """LDAM's exponential profile: int(n_max * (1 / ratio)^(c / (C - 1))) images of class c."""
    return [int(n_max * (1.0 / ratio) ** (c / (num_classes - 1.0))) for c in range(num_classes)]


def read_cifar(folder):
    """(train images (N, 32, 32, 3) uint8, train labels, test images, test labels, fine label names)."""
    def load(name):
        path = folder / name
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{path}: not a CIFAR-100 python file ({e})") from None

    images = lambda d: np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    train, test, meta = load("train"), load("test"), load("meta")
    return (images(train), np.asarray(train["fine_labels"]), images(test), np.asarray(test["fine_labels"]),
            list(meta["fine_label_names"]))


def long_tail_split(labels, ratio, num_classes=100):
    """Indices of the training images kept for imbalance ratio `ratio`, in class order (LIFT's gen_imbalanced_data)."""
    n_max = len(labels) // num_classes
    np.random.seed(0)  # LIFT: np.random.seed(rand_number=0), then one global shuffle per class
    kept = []
    for c, n in zip(range(num_classes), long_tail_counts(n_max, ratio, num_classes)):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        kept.extend(idx[:n].tolist())
    return kept


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="data/cifar100_lt", help="folder holding (or to receive) cifar-100-python/")
    p.add_argument("--ir", type=int, default=100, help="imbalance ratio n_max / n_min (LIFT: 100, 50, 10)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading a missing CIFAR-100")
    args = p.parse_args(argv)
    basics.refuse_out_of_range(args, least=[("--ir", 1)])

    # ---- the source: torchvision's files, downloaded when missing ----
    t0 = time.time()
    root = Path(args.root)
    if root.name == "cifar-100-python" and (root / "meta").exists():  # the folder itself was named
        root = root.parent
    source = root / "cifar-100-python"
    if not (source / "train").exists():
        if args.no_download:
            raise FileNotFoundError(f"{source}: CIFAR-100 not found (torchvision's cifar-100-python folder)")
        import torchvision
        print(f"downloading CIFAR-100 into {root} (torchvision) ...", flush=True)
        try:
            torchvision.datasets.CIFAR100(str(root), train=True, download=True)
        except OSError as e:  # offline, a proxy, a full disk: say where the files go instead
            raise OSError(f"could not download CIFAR-100 into {root} ({e}). Put cifar-100-python.tar.gz (the "
                          f"download itself) in {root}, where torchvision checks and unpacks it without the network, "
                          f"or copy the cifar-100-python/ folder (train, test, meta) to {source}, or name the folder "
                          "holding it with CIFAR_ROOT=") from None
    train_images, train_labels, test_images, test_labels, names = read_cifar(source)
    num_classes = len(names)

    # ---- images, once for every ratio ----
    from PIL import Image
    maker = "00_make_cifar100_lt.py"
    done = basics.claim_folder(root / "images", maker, legacy=(".complete",)) / ".complete"
    if not done.exists():
        for split, images in (("train", train_images), ("test", test_images)):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                Image.fromarray(image).save(root / "images" / split / f"{i:05d}.png")
        basics.atomic_write_text(done, f"{len(train_images)} train, {len(test_images)} test\n")

    # ---- this ratio's splits, in the generic layout (paths relative to ROOT/irIR) ----
    out = basics.claim_folder(root / f"ir{args.ir}", maker, legacy=(".complete", "train.txt"))
    kept = long_tail_split(train_labels, args.ir, num_classes)
    # a file that would come out the same is left alone, so a rerun leaves the chain after it up to date
    basics.write_if_changed(out / "train.txt", "".join(f"../images/train/{i:05d}.png {train_labels[i]}\n"
                                                       for i in kept))
    basics.write_if_changed(out / "test.txt", "".join(f"../images/test/{i:05d}.png {y}\n"
                                                      for i, y in enumerate(test_labels)))
    basics.write_if_changed(out / "classnames.txt", "".join(n.replace("_", " ") + "\n" for n in names))
    counts = np.bincount(train_labels[kept], minlength=num_classes)
    info = dict(ir=args.ir, train=len(kept), test=len(test_labels), max=int(counts.max()), min=int(counts.min()))
    basics.write_if_changed(out / ".complete", json.dumps(info, indent=1) + "\n")
    print(f"CIFAR-100-LT IR {args.ir}: {len(kept)} training images ({info['max']} to {info['min']} per class), "
          f"{len(test_labels)} test in {time.time() - t0:.1f}s -> {out}")


if __name__ == "__main__":
    basics.run_script(main)
