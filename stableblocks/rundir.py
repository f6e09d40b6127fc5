"""The run folder: one run at a time (a lock), never silently reused, and a metrics log that
survives a kill.

A run holds a lock on OUT_DIR/.lock (naming its pid and host) for its whole life; a second run
into the same folder fails at once. The lock ends with its process, however it ends. A folder
that already holds a run is continued only with --resume and replaced only with --overwrite.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from . import checkpoint

LOCK = ".lock"
METRICS = "metrics.jsonl"
# What a run writes (--overwrite removes exactly these).
RUN_FILES = (checkpoint.FILE, METRICS, "config.json", "run.json", "summary.json",
             "loss.png", "grad_norm.png", "tev.png", "attn_logit.png", "output_norms.png")


class RunDirError(ValueError):
    """The run folder is in use, or holds a run that this command would silently reuse."""


class RunLock:
    """OUT_DIR/.lock, held with flock(2) for the run's life. The kernel drops the lock when its
    process ends, however it ends (a kill -9 too): no stale lock to judge by pid, and no window
    in which two runs both take a dead run's lock. The file names the holder, for the message."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                owner = self._owner()
                raise RunDirError(f"out_dir {self.path.parent}: another run (pid {owner.get('pid', '?')} on {owner.get('host', '?')}) "
                                  "is using it; wait for it, or choose another --out-dir") from None
            except OSError as e:
                os.close(fd)
                raise RunDirError(f"out_dir {self.path.parent}: cannot lock {self.path} ({e.strerror}); "
                                  "choose an --out-dir on a filesystem with file locks") from None
            # The holder may have released (and removed) the file between our open and our lock:
            # then we hold a lock on a file nobody else will see; take the one at the path.
            try:
                here = os.stat(self.path)
            except FileNotFoundError:
                here = None
            mine = os.fstat(fd)
            if here is None or (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
            self.fd = fd
            return self

    def _owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text() or "{}")
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # still locked: whoever opened it retries on a new file
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def check_reuse(folder: str | Path, resume: bool, overwrite: bool) -> None:
    """A folder holding a run needs --resume or --overwrite; --resume needs a checkpoint."""
    folder = Path(folder)
    found = [name for name in RUN_FILES if (folder / name).exists()]
    if resume and not (folder / checkpoint.FILE).exists():
        raise RunDirError(f"resume: no checkpoint at {folder / checkpoint.FILE}; start without --resume"
                          + (" (with --overwrite to replace what is there)" if found else ""))
    if found and not (resume or overwrite):
        raise RunDirError(f"out_dir {folder}: already holds a run ({', '.join(found)}); pass --resume to continue it, "
                          "--overwrite to replace it, or choose another --out-dir")


def clear(folder: str | Path) -> None:
    """--overwrite: remove the previous run's files (and nothing else)."""
    for name in RUN_FILES:
        (Path(folder) / name).unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    checkpoint.atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


class MetricsLog:
    """metrics.jsonl, written by rank 0 a line at a time (a killed run keeps what it logged).

    On resume, rows from the checkpoint's step on are dropped (the resumed run writes them
    again), and a torn last line (a kill mid-write) is cut off with a message.
    """

    def __init__(self, path: Path, keep_before: int | None, active: bool):
        self.path, self.file = path, None
        if not active:
            return
        rows = []
        if keep_before is not None and path.exists():
            lines = path.read_bytes().split(b"\n")
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    if any(rest.strip() for rest in lines[i + 1 :]):
                        raise RunDirError(f"{path}: line {i + 1} is not JSON; fix or delete that line, then --resume again") from None
                    print(f"{path}: its last line was cut off by a kill; truncated to the last whole row", file=sys.stderr)
                    break
                if row.get("step", keep_before) < keep_before:
                    rows.append(line.decode() + "\n")
        checkpoint.atomic_write(path, lambda f: f.write("".join(rows).encode()))
        self.file = open(path, "a")

    def write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
