"""Argument checks shared by the ops: a clear ValueError naming the argument, before any launch."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Wider rows spill registers in the LayerNorm-family backward kernels (ptxas, sm_90a, triton 3.9).
LN_MAX_WIDTH = 4096


# Head widths the attention kernel takes (FlashAttention-2's range), and the widest it takes in
# float32, whose 3xTF32 matmuls hold every operand twice.
ATTENTION_HEAD_DIMS = tuple(range(16, 257, 8))
ATTENTION_FP32_MAX_HEAD_DIM = 128


def kernel_limits(name: str, t: torch.Tensor, max_width: int = LN_MAX_WIDTH) -> str | None:
    """Why the LayerNorm-family kernels cannot take `t` (None when they can): backend "triton"
    raises it, "auto" takes the reference instead."""
    if t.dtype not in KERNEL_DTYPES:
        return f"{name}: the Triton kernels take float32, bfloat16 or float16, got {t.dtype}"
    if t.shape[-1] > max_width:
        return f"{name}: width {t.shape[-1]} exceeds the Triton kernels' {max_width}"
    if t.shape[-1] == 0:
        return f"{name}: width 0 (the Triton kernels take rows of 1 to {max_width} values)"
    return None


def attention_limits(q: torch.Tensor) -> str | None:
    """Why the attention kernel cannot take q (and k, v, of q's shape and dtype); None when it can."""
    if q.dtype not in KERNEL_DTYPES:
        return f"q: dtype {q.dtype} is not supported by the Triton kernel; expected float32, bfloat16 or float16"
    D = q.shape[-1]
    if D not in ATTENTION_HEAD_DIMS:
        return f"q: head width D={D} is not supported by the Triton kernel; it takes multiples of 8 from 16 to 256"
    if q.dtype == torch.float32 and D > ATTENTION_FP32_MAX_HEAD_DIM:
        return (f"q: head width D={D} in float32 is not supported by the Triton kernel (float32 up to "
                f"{ATTENTION_FP32_MAX_HEAD_DIM}; bfloat16 and float16 up to 256)")
    return None


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_eps(eps) -> None:
    """LayerNorm's eps: a finite float >= 0. 0 is LayerNorm without a regulariser: a row of equal
    values (zero variance) then normalises to non-finite values, as in torch.nn.functional.layer_norm."""
    if not _real(eps) or eps < 0:
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")


def check_finite(name: str, value) -> None:
    """A finite float (a scale factor)."""
    if not _real(value):
        raise ValueError(f"{name}: expected a finite float, got {value!r}")


def check_positive(name: str, value, optional: bool = True) -> None:
    """A finite float > 0 (or None when optional): a logit scale or a soft-cap."""
    if value is None and optional:
        return
    if not _real(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite float > 0{' or None' if optional else ''}, got {value!r}")


def check_rows(name: str, t: torch.Tensor) -> None:
    """An op over the last dimension needs one."""
    if t.dim() == 0:
        raise ValueError(f"{name}: expected a tensor with at least one dimension (normalised over the last), "
                         "got a 0-dim tensor")


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
