"""Argument checks shared by the ops: a clear ValueError naming the argument, before any launch."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a float32, bfloat16, float16 or float64 tensor, got {t.dtype}")


def check_same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name}: expected a tensor on {ref.device} like {ref_name}, got {t.device}")


def check_norm_params(name: str, weight: torch.Tensor | None, bias: torch.Tensor | None, width: int) -> None:
    """A LayerNorm's (weight, bias): weight of shape (width,), bias None or the same shape."""
    if weight is None:
        if bias is not None:
            raise ValueError(f"{name}: a bias was given without a weight")
        return
    for part, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_float(f"{name} {part}", t)
        if tuple(t.shape) != (width,):
            raise ValueError(f"{name} {part}: expected shape ({width},), got {tuple(t.shape)}")
