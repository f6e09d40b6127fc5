"""Residual add with the optional post-sublayer norm, and the next pre-norm in the same pass.

y = x + LN(z) (or x + z without a post-norm); with next_weight also n = LN_next(y).
Only ever used inside one block: a block touches its own weights alone (FSDP2 shards per block).
"""

from __future__ import annotations

import torch

from . import layer_norm as _ln
from .backend import use_triton
from .checks import check_eps, check_float, check_norm_params, check_rows, check_same_device, kernel_limits


def reference(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    next_weight: torch.Tensor | None = None,
    next_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
):
    y = x + (z if weight is None else _ln.reference(z, weight, bias, eps))
    if next_weight is None:
        return y
    return y, _ln.reference(y, next_weight, next_bias, eps)


def fused_add_norm(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    next_weight: torch.Tensor | None = None,
    next_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
):
    """Returns y, or (y, LN_next(y)) when next_weight is given.

    x and z may differ in dtype (autocast: an fp32 residual beside a bf16 sub-layer output); y and
    n then take the promoted dtype, as `x + LN(z)` in PyTorch would."""
    check_float("x", x)
    check_float("z", z)
    check_rows("x", x)
    check_eps(eps)
    if x.shape != z.shape:
        raise ValueError(f"z: expected the shape of x {tuple(x.shape)}, got {tuple(z.shape)}")
    check_norm_params("post-norm", weight, bias, x.shape[-1])
    check_norm_params("next norm", next_weight, next_bias, x.shape[-1])
    check_same_device("x", x, z=z, weight=weight, bias=bias, next_weight=next_weight, next_bias=next_bias)
    if use_triton("fused_add_norm", x, kernel_limits("x", x) or kernel_limits("z", z)):
        from .fused_add_norm_triton import fused_add_norm as kernel

        return kernel(x, z, weight, bias, next_weight=next_weight, next_bias=next_bias, eps=eps)
    return reference(x, z, weight, bias, next_weight=next_weight, next_bias=next_bias, eps=eps)
