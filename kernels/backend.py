"""One switch that decides, per call, whether an op runs its Triton kernel or its reference.

"auto": Triton on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 (Triton's
interpreter); the plain-PyTorch reference otherwise, so CPU users train normally.
"triton": always the kernel (an op without one raises NotImplementedError).
"reference": always the reference.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter

import torch

BACKENDS = ("auto", "triton", "reference")

# Ops whose Triton kernel exists; each kernel module adds its name when imported.
KERNELS: set[str] = set()

# Triton launches by kernel name: tests read it to prove no op fell back to its reference.
LAUNCHES: Counter[str] = Counter()

_backend = os.environ.get("STABLEBLOCKS_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"STABLEBLOCKS_BACKEND={_backend!r}: expected one of {BACKENDS}")


def set_backend(name: str) -> None:
    """Select "auto", "triton" or "reference" for every op."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r}: expected one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def using(name: str):
    """Run a block under backend `name`, then restore the previous one."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(op: str, x: torch.Tensor, unsupported: str | None = None) -> bool:
    """True when `op` should launch its Triton kernel for input `x`.

    `unsupported` says why the kernel cannot take these inputs (a dtype, a width): backend
    "triton" raises it as a ValueError, "auto" takes the reference.
    """
    if _backend == "reference":
        return False
    if _backend == "triton":
        if op not in KERNELS:
            raise NotImplementedError(f"{op}: no Triton kernel yet; use the 'reference' backend")
        if not (x.is_cuda or interpreting()):
            raise RuntimeError(
                f"{op}: backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors"
            )
        if unsupported:
            raise ValueError(f"{unsupported} (backend 'auto' takes the reference for such inputs)")
        return True
    return op in KERNELS and not unsupported and (x.is_cuda or (x.device.type == "cpu" and interpreting()))


def load_kernels() -> None:
    """Import each op's Triton module (`<op>_triton.py`, which adds the op to KERNELS)."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return
    for op in ("layer_norm", "fused_embedding", "fused_add_norm", "fused_attention", "fused_linear_cross_entropy"):
        name = f"{__package__}.{op}_triton"
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
