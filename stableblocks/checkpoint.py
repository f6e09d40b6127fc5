"""Checkpoints: one file holding everything a run needs to continue, written atomically.

The model and optimizer states are full (unsharded) state dicts keyed by parameter name, made with
torch.distributed.checkpoint's state-dict API, so a checkpoint written by a DDP or FSDP2 run
loads into any number of processes, one included. Writes go to a temporary file in the same
folder, are flushed to disk, then renamed over the old checkpoint: a kill during a write leaves
the previous checkpoint whole. Each checkpoint carries a SHA-256 of its contents (every tensor's
bytes, dtype and shape, and every other value), checked when it is read back.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

FILE = "ckpt.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or whose contents do not match its checksum."""


def _digest(obj, h) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode() + b":")
            _digest(obj[k], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _digest(v, h)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def checksum(state: dict) -> str:
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "checksum"}, h)
    return h.hexdigest()


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed writes left in `folder` (call it only while no
    other process writes there)."""
    stale = [p for p in Path(folder).glob(".*.tmp[0-9]*") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def atomic_write(path: str | Path, write) -> None:
    """write(file) into a temporary file beside `path`, fsync, then rename over `path`: a kill
    at any point leaves the old file whole (and at worst a temporary that remove_stale_temps deletes)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a failed write (e.g. disk full) names no file: name the one at stake
            raise OSError(e.errno, f"{e.strerror} writing {path}") from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself reaches the disk
    finally:
        os.close(fd)


def save(state: dict, path: str | Path) -> None:
    """torch.save with a checksum, atomically."""
    state = {**state, "checksum": checksum(state)}
    atomic_write(path, lambda f: torch.save(state, f))


def load(path: str | Path) -> dict:
    """The checkpoint at `path`, its checksum verified; CheckpointError names the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"resume: no checkpoint at {path}; start without --resume (or with --overwrite)")
    fix = "restore it from a copy, or start the run again with --overwrite"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (empty, truncated, not a zip, unpickling: all mean "unreadable")
        why = str(e).split(". ")[0].splitlines()[0] if str(e) else "empty"
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {why}); {fix}") from None
    if not isinstance(state, dict) or "checksum" not in state:
        raise CheckpointError(f"{path}: no checksum (not a stableblocks checkpoint, or from an older version); {fix}")
    if checksum(state) != state["checksum"]:
        raise CheckpointError(f"{path}: corrupt checkpoint (its contents do not match its checksum); {fix}")
    return state


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts (on CPU). Every process must call it under DDP/FSDP2."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=opts)


def load_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Load full state dicts into a plain, DDP or FSDP2 model (every process reads the file)."""
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True, strict=True))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states() -> list[dict]:
    """Every process's RNG states, in rank order (the same run resumes each process's stream)."""
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def all_finite(obj) -> bool:
    """Every floating-point tensor in a (nested) state is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True
