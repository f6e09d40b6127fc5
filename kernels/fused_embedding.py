"""Token + position embedding, scaled (Scaled Embed) and optionally normalised (Embed LN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import layer_norm as _ln
from .backend import use_triton
from .checks import check_eps, check_finite, check_float, check_norm_params, check_same_device, kernel_limits


def reference(
    idx: torch.Tensor,
    wte: torch.Tensor,
    wpe: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    e = F.embedding(idx, wte)
    if wpe is not None:
        e = e + wpe[: idx.shape[-1]]
    if scale != 1.0:
        e = e * scale
    if ln_weight is not None:
        e = _ln.reference(e, ln_weight, ln_bias, eps)
    return e


def fused_embedding(
    idx: torch.Tensor,
    wte: torch.Tensor,
    wpe: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """(wte[idx] + wpe[arange(T)]) * scale, then LayerNorm when ln_weight is given -> (B, T, d)."""
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        got = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"idx: expected an int64 or int32 tensor of token ids, got {got}")
    if idx.dim() != 2:
        raise ValueError(f"idx: expected shape (B, T), got {tuple(idx.shape)}")
    check_float("wte", wte)
    if wte.dim() != 2:
        raise ValueError(f"wte: expected shape (vocab, d), got {tuple(wte.shape)}")
    d = wte.shape[1]
    if wpe is not None:
        check_float("wpe", wpe)
        if wpe.dtype != wte.dtype:
            raise ValueError(f"wpe: expected the dtype of wte ({wte.dtype}), got {wpe.dtype}")
        if wpe.dim() != 2 or wpe.shape[1] != d:
            raise ValueError(f"wpe: expected shape (block_size, {d}), got {tuple(wpe.shape)}")
        if idx.shape[1] > wpe.shape[0]:
            raise ValueError(f"idx: sequence length {idx.shape[1]} exceeds the {wpe.shape[0]} position embeddings")
    check_norm_params("ln", ln_weight, ln_bias, d)
    check_eps(eps)
    check_finite("scale", scale)
    check_same_device("wte", wte, idx=idx, wpe=wpe, ln_weight=ln_weight, ln_bias=ln_bias)
    # Token ids are range-checked inside the op (see there).
    if use_triton("fused_embedding", wte, kernel_limits("wte", wte)):
        from .fused_embedding_triton import fused_embedding as kernel

        return kernel(idx, wte, wpe, scale=scale, ln_weight=ln_weight, ln_bias=ln_bias, eps=eps)
    return reference(idx, wte, wpe, scale=scale, ln_weight=ln_weight, ln_bias=ln_bias, eps=eps)
