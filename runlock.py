"""One make at a time per run directory: the Makefile calls this while it reads itself, before any stage runs.

    python3 runlock.py RUN MAKE_PID DATASET      (prints "ok", or one line saying why not; DATASET - takes any)

The stages lock their own output folder while they run, but between two stages a run holds nothing, so a second
`make all` on the same RUN could slip in and the first would then fail. Here the first make takes RUN/.make.lock for
its whole life: a small keeper process, started here, holds the lock until that make's process is gone (Ctrl-C and
kill -9 included, the OS drops the lock with the keeper). A second make on the same RUN is refused at once, naming
the first. It also refuses a RUN that holds another dataset's outputs, which would otherwise be overwritten. A RUN
folder that this make created and left with nothing in it but the lock (a typo in DATASET, a missing dataset, Ctrl-C
before stage 01 wrote anything) is removed again when the make ends; nothing else is ever removed.

Standard library only: it runs with the system's python3, before make has built the virtual environment.
"""
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def other_dataset(run, dataset):
    """The dataset whose outputs RUN already holds, when it is not this one ("-": any dataset, for make report)."""
    corpus = run / "corpus.json"
    try:
        held = json.loads(corpus.read_text(encoding="utf-8"))["meta"]["dataset"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return held if held != dataset and dataset != "-" else None


def tidy(run, created, lock):
    """Remove the lock and the folders acquire() created for RUN, when nothing but the lock was ever put there."""
    try:
        if [p.name for p in run.iterdir()] != [lock.name]:
            return
        lock.unlink()
        for folder in created:  # innermost first; a folder someone else filled meanwhile stays
            folder.rmdir()
    except OSError:
        pass


def acquire(run, make_pid, dataset):
    created = [p for p in (run, *run.parents) if not p.exists()]  # innermost first
    run.mkdir(parents=True, exist_ok=True)
    held = other_dataset(run, dataset)
    if held:
        return (f"RUN={run} holds the outputs of DATASET={held} (corpus.json), not DATASET={dataset}: give this run "
                f"another RUN=..., or remove {run} first (make clean RUN={run} DATASET={held})")
    path = run / ".make.lock"
    for _ in range(50):  # a make that just ended leaves its keeper up to 0.2 s longer
        run.mkdir(parents=True, exist_ok=True)  # that keeper may have just tidied the folder away
        try:
            f = open(path, "a+", encoding="utf-8")
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
            f.close()  # the lock file this one opened was tidied away meanwhile: take the new one
            continue
        except FileNotFoundError:
            f.close()
            continue
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            try:
                pid = int(holder.split("make pid ")[1].split(" ")[0])
            except (IndexError, ValueError):
                pid = None
            if pid == make_pid:
                return "ok"  # this make already holds it
            if pid is not None and alive(pid):
                return (f"RUN={run} is in use by {holder}: wait for that make to finish, or give this one another "
                        f"RUN=... (lock file {path})")
            time.sleep(0.1)
    else:
        return f"RUN={run}: could not take {path}"
    f.seek(0)
    f.truncate()
    f.write(f"make pid {make_pid} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    if os.fork():  # the parent answers make at once; the child keeps the lock while make lives
        return "ok"
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # make waits for its $(shell ...) output to close: the keeper lets go of it
        os.dup2(devnull, fd)
    while alive(make_pid):
        time.sleep(0.2)
    if created:  # still holding the lock, so no other make is using this folder
        tidy(run, created, path)
    os._exit(0)


def main(run, make_pid, dataset):
    """acquire()'s answer; a RUN that cannot be a folder (a file of that name or on its path, no permission) is one
    line naming the culprit, not a traceback inside make's error."""
    try:
        return acquire(run, make_pid, dataset)
    except OSError as e:
        file = next((p for p in reversed((run, *run.parents)) if p.exists() and not p.is_dir()), None)
        why = (f"{file} is a file, not a folder" if file else f"{e.filename or run}: {(e.strerror or str(e)).lower()}")
        return f"RUN={run} cannot be the run folder ({why}): name another folder with RUN="


if __name__ == "__main__":
    print(main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]), flush=True)
