"""The run folder: one run at a time (a lock), never silently reused, and a metrics log that
survives a kill.

A run takes OUT_DIR/.lock (its pid and host) for its whole life; a second run into the same folder
fails at once, unless the pid in the lock is dead on this host (a killed run), whose lock is
replaced. A folder that already holds a run is continued only with --resume and replaced only
with --overwrite.
"""

from __future__ import annotations

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """OUT_DIR/.lock, created exclusively; a lock whose pid is dead on this host is stale."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK
        self.held = False

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
                    self.path.unlink(missing_ok=True)  # a killed run's lock
                    continue
                raise RunDirError(f"out_dir {self.path.parent}: another run (pid {owner.get('pid', '?')} on {owner.get('host', '?')}) "
                                  f"is using it; wait for it, or choose another --out-dir (if no run is, delete {self.path})") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return self
        raise RunDirError(f"out_dir {self.path.parent}: could not take {self.path}")

    def _owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text() or "{}")
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

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
