"""Causal (or full) multi-head attention with per-head QK-norm / QKV-norm and logit soft-capping.

q, k, v: (B, T, H, D), the layout a QKV projection produces (no transpose). Each *_norm is None
or a (weight, bias) pair of shape (D,) shared across heads. Scores are q k^T * scale (scale
defaults to 1/sqrt(D)), soft-capped as cap * tanh(s / cap) when softcap is set, then masked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import layer_norm as _ln
from .backend import use_triton
from .checks import check_float, check_norm_params, check_same_device



def _norm(t: torch.Tensor, params, eps: float) -> torch.Tensor:
    return t if params is None else _ln.reference(t, params[0], params[1], eps)


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softcap: float | None = None,
    q_norm=None,
    k_norm=None,
    v_norm=None,
    scale: float | None = None,
    eps: float = 1e-5,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Plain PyTorch in q's dtype. Without a cap it is SDPA; with one it materialises the scores."""
    q, k, v = (_norm(t, p, eps).transpose(1, 2) for t, p in ((q, q_norm), (k, k_norm), (v, v_norm)))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if softcap is None:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
    else:
        s = (q @ k.transpose(-2, -1)) * scale
        s = softcap * torch.tanh(s / softcap)
        if causal:
            T = s.shape[-1]
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        p = torch.softmax(s, dim=-1)
        if dropout_p > 0:
            p = F.dropout(p, dropout_p)
        o = p @ v
    return o.transpose(1, 2)


def raw_logits(q: torch.Tensor, k: torch.Tensor, *, q_norm=None, k_norm=None, scale=None, eps=1e-5) -> torch.Tensor:
    """The scaled logits q k^T * scale before any cap or mask, (B, H, T, T): what diagnostics read."""
    q, k = (_norm(t, p, eps).transpose(1, 2) for t, p in ((q, q_norm), (k, k_norm)))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return (q @ k.transpose(-2, -1)) * scale


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softcap: float | None = None,
    q_norm=None,
    k_norm=None,
    v_norm=None,
    scale: float | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Attention over (B, T, H, D) inputs -> (B, T, H, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name}: expected shape (B, T, H, D), got {tuple(t.shape)}")
        if t.shape != q.shape or t.dtype != q.dtype:
            raise ValueError(f"{name}: expected the shape and dtype of q {tuple(q.shape)} {q.dtype}, got {tuple(t.shape)} {t.dtype}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap: expected a positive float or None, got {softcap}")
    D = q.shape[-1]
    norms = {}
    for name, p in (("q_norm", q_norm), ("k_norm", k_norm), ("v_norm", v_norm)):
        if p is not None:
            if not isinstance(p, (tuple, list)) or len(p) != 2:
                raise ValueError(f"{name}: expected None or a (weight, bias) pair, got {type(p).__name__}")
            check_norm_params(name, p[0], p[1], D)
            norms[f"{name}_weight"], norms[f"{name}_bias"] = p
    check_same_device("q", q, k=k, v=v, **norms)
    if use_triton("fused_attention", q):
        from .fused_attention_triton import DTYPES, HEAD_DIMS
        from .fused_attention_triton import fused_attention as kernel

        if D not in HEAD_DIMS:
            raise ValueError(f"q: head width D={D} is not supported by the Triton kernel; supported head widths: "
                             f"{', '.join(map(str, HEAD_DIMS))} (the reference backend takes any D)")
        if q.dtype not in DTYPES:
            raise ValueError(f"q: dtype {q.dtype} is not supported by the Triton kernel; expected float32, "
                             "bfloat16 or float16 (the reference backend takes float64)")
        return kernel(q, k, v, causal=causal, softcap=softcap, q_norm=q_norm, k_norm=k_norm, v_norm=v_norm, scale=scale, eps=eps)
    return reference(q, k, v, causal=causal, softcap=softcap, q_norm=q_norm, k_norm=k_norm, v_norm=v_norm, scale=scale, eps=eps)
