"""Causal (or full) multi-head attention with per-head QK-norm / QKV-norm and logit soft-capping.

q, k, v: (B, T, H, D), the layout a QKV projection produces (no transpose). Each *_norm is None
or a (weight, bias) pair of shape (D,) shared across heads. Scores are q k^T * scale (scale
defaults to 1/sqrt(D)), soft-capped as cap * tanh(s / cap) when softcap is set, then masked.
eps is the norms' LayerNorm eps (>= 0; 0 means no regulariser: a q, k or v row of equal values
then normalises to non-finite values, as in torch.nn.functional.layer_norm).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import layer_norm as _ln
from .backend import use_triton
from .checks import attention_limits, check_eps, check_float, check_norm_params, check_positive, check_same_device


def _norm(t: torch.Tensor, params, eps: float) -> torch.Tensor:
    # q, k, v are strided views of the QKV projection: the LayerNorm would copy the view to a
    # contiguous block in forward and again in backward; one copy, which it keeps, serves both.
    return t if params is None else _ln.reference(t.contiguous(), params[0], params[1], eps)


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
    return_max_logit: bool = False,
):
    """Plain PyTorch in q's dtype. Without a cap it is SDPA; with one, or when the max logit is
    requested, it materialises the scores."""
    q, k, v = (_norm(t, p, eps).transpose(1, 2) for t, p in ((q, q_norm), (k, k_norm), (v, v_norm)))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    materialise = softcap is not None or return_max_logit
    T = q.shape[-2]
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1) if causal and materialise else None
    raw = (q @ k.transpose(-2, -1)) * scale if materialise else None
    if softcap is None:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
    else:
        s = softcap * torch.tanh(raw / softcap)
        if causal:
            s = s.masked_fill(future, float("-inf"))
        p = torch.softmax(s, dim=-1)
        if dropout_p > 0:
            p = F.dropout(p, dropout_p)
        o = p @ v
    o = o.transpose(1, 2)
    if not return_max_logit:
        return o
    return o, _head_max(raw.detach(), future)


def _head_max(raw: torch.Tensor, future: torch.Tensor | None) -> torch.Tensor:
    """(H,) fp32: max over batch and visible positions of (B, H, T, T) raw logits (-inf if none)."""
    if future is not None:
        raw = raw.masked_fill(future, float("-inf"))
    B, H, T, _ = raw.shape
    if raw.numel() == 0:
        return raw.new_full((H,), float("-inf"), dtype=torch.float32)
    return raw.transpose(0, 1).reshape(H, -1).amax(dim=1).float()


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
    return_max_logit: bool = False,
):
    """Attention over (B, T, H, D) inputs -> (B, T, H, D).

    With return_max_logit=True -> (o, max_logit): max_logit (H,) fp32, per head the largest raw
    scaled logit scale * q.k over the visible positions of every sequence of the batch (signed;
    after any QK-norm, before the soft-cap), not differentiable. The kernel takes it from the
    tiles it computes anyway; the reference materialises the scores for it.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name}: expected shape (B, T, H, D), got {tuple(t.shape)}")
        if t.shape != q.shape or t.dtype != q.dtype:
            raise ValueError(f"{name}: expected the shape and dtype of q {tuple(q.shape)} {q.dtype}, got {tuple(t.shape)} {t.dtype}")
    if q.shape[-1] == 0:
        raise ValueError(f"q: expected a head width D >= 1, got shape {tuple(q.shape)}")
    check_positive("softcap", softcap)
    check_positive("scale", scale)
    check_eps(eps)
    D = q.shape[-1]
    norms = {}
    for name, p in (("q_norm", q_norm), ("k_norm", k_norm), ("v_norm", v_norm)):
        if p is not None:
            if not isinstance(p, (tuple, list)) or len(p) != 2:
                raise ValueError(f"{name}: expected None or a (weight, bias) pair, got {type(p).__name__}")
            check_norm_params(name, p[0], p[1], D)
            norms[f"{name}_weight"], norms[f"{name}_bias"] = p
    check_same_device("q", q, k=k, v=v, **norms)
    if use_triton("fused_attention", q, attention_limits(q)):
        from .fused_attention_triton import fused_attention as kernel

        return kernel(q, k, v, causal=causal, softcap=softcap, q_norm=q_norm, k_norm=k_norm, v_norm=v_norm, scale=scale,
                      eps=eps, return_max_logit=return_max_logit)
    return reference(q, k, v, causal=causal, softcap=softcap, q_norm=q_norm, k_norm=k_norm, v_norm=v_norm, scale=scale,
                     eps=eps, return_max_logit=return_max_logit)
