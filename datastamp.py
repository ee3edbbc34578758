"""What make knows of a split's images: one digest of every listed image's path, size and modification time.

    python3 datastamp.py ROOT SPLIT_FILE ...      (prints one 16-digit digest per split file, in the order given)

The Makefile records these digests with each stage's settings (RUN/params/), so an image added, removed or replaced
in place (`cp new.png test/c0/0000.png`) makes the stages that read that split run again, while an untouched dataset
costs one stat per image (about a second per 100,000 images). A listed image that is missing counts as such: the stage
then says which line names it. iNaturalist's COCO-style JSON splits are read too. Standard library only: it runs
with the system's python3, before make has built the virtual environment.
"""
import hashlib
import json
import os
import sys


def listed_images(path):
    """The relative paths a split file lists, in order: 'relative/path label' lines, or a COCO JSON's file names."""
    if path.endswith(".json"):
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
        return [im.get("file_name", "") for im in data.get("images", [])]
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        return [line.strip().rsplit(maxsplit=1)[0] for line in f if len(line.split()) >= 2]


def image_path(root, rel, flat=False):
    """Where a split file's image is: under the data root (a leading '/' read from the root too, as the kit always
    did), or, for an absolute path that is not there, at that path when it exists (a list a user wrote with `find
    /data/...`). With `flat` (flat_folder), one folder up from where the file names it."""
    under = os.path.join(root, rel.lstrip("/"))
    if os.path.isabs(rel) and not os.path.exists(under) and os.path.exists(rel):
        return rel
    return one_up(under) if flat else under


def one_up(path):
    return os.path.join(os.path.dirname(os.path.dirname(path)), os.path.basename(path))


def flat_folder(root, rels):
    """Whether a split file's images lie one folder up from where it names them, read off its first image (missing
    where named, there one folder up): ImageNet's own val/ holds its 50,000 images in one folder, where OLTR's
    ImageNet_LT_test.txt names val/<wnid>/<file> (its ImageNet_LT_val.txt names train/ images). A whole file is read
    one way."""
    if not rels:
        return False
    named = image_path(root, rels[0])
    return not os.path.exists(named) and os.path.exists(one_up(named))


def stamp(root, path):
    h = hashlib.sha1()
    try:
        images = listed_images(path)
    except (OSError, ValueError) as e:  # the stage reports a broken split file, naming its line
        return "unreadable-" + hashlib.sha1(str(e).encode()).hexdigest()[:8]
    flat = flat_folder(root, images)
    for rel in images:
        try:
            st = os.stat(image_path(root, rel, flat))
            h.update(f"{rel} {st.st_size} {st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{rel} missing\n".encode())
    return h.hexdigest()[:16]


if __name__ == "__main__":
    root, files = sys.argv[1], sys.argv[2:]
    print(" ".join(stamp(root, f) for f in files))
