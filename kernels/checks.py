"""Argument checks shared by the ops: a clear ValueError naming the argument, before any launch."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Wider rows spill registers in the LayerNorm-family backward kernels (ptxas, sm_90a, triton 3.9).
LN_MAX_WIDTH = 4096


def kernel_limits(name: str, t: torch.Tensor, max_width: int = LN_MAX_WIDTH) -> str | None:
    """Why the LayerNorm-family kernels cannot take `t` (None when they can): backend "triton"
    raises it, "auto" takes the reference instead."""
    if t.dtype not in KERNEL_DTYPES:
        return f"{name}: the Triton kernels take float32, bfloat16 or float16, got {t.dtype}"
    if t.shape[-1] > max_width:
        return f"{name}: width {t.shape[-1]} exceeds the Triton kernels' {max_width}"
    return None


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
