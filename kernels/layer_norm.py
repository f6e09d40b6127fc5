"""LayerNorm over the last dimension: y = (x - mean) / sqrt(var + eps) * weight + bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import use_triton
from .checks import check_eps, check_float, check_norm_params, check_rows, check_same_device, kernel_limits


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Plain PyTorch in x's dtype: the CPU path and the test oracle (run it in float64)."""
    bias = None if bias is None else bias.to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """eps >= 0; with eps = 0 a row of equal values normalises to non-finite values (no regulariser)."""
    check_float("x", x)
    check_rows("x", x)
    check_eps(eps)
    if weight is None:
        raise ValueError("weight: expected a tensor of shape (x.shape[-1],), got None")
    check_norm_params("layer_norm", weight, bias, x.shape[-1])
    check_same_device("x", x, weight=weight, bias=bias)
    if use_triton("layer_norm", x, kernel_limits("x", x)):
        from .layer_norm_triton import layer_norm as kernel

        return kernel(x, weight, bias, eps)
    return reference(x, weight, bias, eps)
