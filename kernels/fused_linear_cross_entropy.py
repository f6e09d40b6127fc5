"""LM head + cross-entropy in one op, with the final-logit soft-cap and z-loss, never holding the logits.

u = h W^T + b, z = cap * tanh(u / cap) (or u), and per kept token (target != ignore_index)
lse - z[target] + z_loss * lse^2; the loss is their mean over the kept tokens (or their sum).
SPEC.md, "Fused linear cross-entropy", gives the gradients.

Both paths work on row chunks and recompute each chunk's logits in backward: forward saves
only one fp32 log-sum-exp per token (the reference, when a single chunk holds every row, keeps
that chunk's logits instead of recomputing them). Extra memory beyond the inputs and gradients:
O(N) for the per-token values plus one chunk of logits (the reference: at most
_REFERENCE_CHUNK fp32 values and their temporaries; the Triton path: see its module), plus an
fp32 accumulator of d weight when the weight is not fp32.

When every target is ignored the loss is 0 and every gradient is 0 (the materialising formula,
F.cross_entropy's mean over no tokens, gives NaN).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .backend import use_triton
from .checks import KERNEL_DTYPES, check_float, check_same_device

IGNORE_INDEX = -100  # F.cross_entropy's and Hugging Face's
REDUCTIONS = ("mean", "sum")
# Logit values per reference chunk: about 32 MB per fp32 temporary.
_REFERENCE_CHUNK = 1 << 23


class LossDiagnostics(NamedTuple):
    """Over the kept tokens (0 when there are none); no gradient flows through them."""

    lse_mean: torch.Tensor  # mean log-sum-exp of the (capped) logits: log Z, Wortsman's drift signal
    lse_sq_mean: torch.Tensor  # mean lse^2: what z-loss penalises
    max_abs_logit: torch.Tensor  # max |u|, the logit before the cap


def _acc_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None):
    """(u, z) of a row chunk in fp32 (float64 for float64 h): the matmul in h's dtype, as the
    materialising path does it."""
    u = F.linear(h, weight, bias).to(_acc_dtype(h))
    return u, (u if softcap is None else softcap * torch.tanh(u / softcap))


class _ChunkedLoss(torch.autograd.Function):
    """Per-token losses (fp32, 0 where ignored), lse and max |u| (non-differentiable), chunk by chunk."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ignore_index, softcap, z_loss, with_max):
        n, vocab = h.shape[0], weight.shape[0]
        w = weight.to(h.dtype)
        b = None if bias is None else bias.to(h.dtype)
        rows_per_chunk = max(1, _REFERENCE_CHUNK // vocab)
        losses, lses, umaxes = [], [], []
        for start in range(0, n, rows_per_chunk):
            t = targets[start:start + rows_per_chunk]
            u, z = _logits(h[start:start + rows_per_chunk], w, b, softcap)
            kept = t != ignore_index
            lse = torch.logsumexp(z, dim=-1)
            zt = z.gather(1, torch.where(kept, t, 0).unsqueeze(1)).squeeze(1)
            losses.append(torch.where(kept, lse - zt + z_loss * lse * lse, 0.0))
            lses.append(lse)
            if with_max:  # a full extra pass over the chunk: only when diagnostics ask for it
                umaxes.append(torch.where(kept, u.abs().amax(dim=-1), 0.0))
        cat = (lambda parts: torch.cat(parts)) if n else (lambda _: h.new_zeros(0, dtype=_acc_dtype(h)))
        loss, lse = cat(losses), cat(lses)
        umax = cat(umaxes) if with_max else h.new_zeros(0, dtype=_acc_dtype(h))
        # One chunk holds every row: keep its logits (within the chunk bound) rather than recompute them.
        kept_z = z if 0 < n <= rows_per_chunk else None
        ctx.save_for_backward(h, weight, bias, targets, lse, kept_z)
        ctx.options = ignore_index, softcap, z_loss, rows_per_chunk
        ctx.mark_non_differentiable(lse, umax)
        return loss, lse, umax

    @staticmethod
    def backward(ctx, g, _dlse, _dumax):
        h, weight, bias, targets, lse, kept_z = ctx.saved_tensors
        ignore_index, softcap, z_loss, rows_per_chunk = ctx.options
        w = weight.to(h.dtype)
        b = None if bias is None else bias.to(h.dtype)
        dh = torch.empty_like(h, memory_format=torch.contiguous_format)
        # d weight accumulates in fp32, chunk after chunk (a fixed order).
        acc = _acc_dtype(h)
        dw = torch.zeros(weight.shape, dtype=acc, device=h.device)
        db = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=h.device)
        for start in range(0, h.shape[0], rows_per_chunk):
            end = start + rows_per_chunk
            hc, t, lse_c = h[start:end], targets[start:end], lse[start:end]
            z = kept_z if kept_z is not None else _logits(hc, w, b, softcap)[1]
            kept = t != ignore_index
            gk = torch.where(kept, g[start:end].to(acc), 0.0)
            dz = torch.exp(z - lse_c[:, None]) * (gk * (1 + 2 * z_loss * lse_c))[:, None]
            dz.scatter_add_(1, torch.where(kept, t, 0).unsqueeze(1), -gk.unsqueeze(1))
            du = dz if softcap is None else dz * (1 - (z / softcap) ** 2)
            dh[start:end] = du.to(h.dtype) @ w
            dw.addmm_(du.t(), hc.to(acc))
            if db is not None:
                db += du.sum(0)
        return (dh, dw.to(weight.dtype), None if db is None else db.to(bias.dtype), None, None, None, None, None)


def reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None,
              ignore_index: int = IGNORE_INDEX, softcap: float | None = None, z_loss: float = 0.0,
              with_max: bool = True):
    """Chunked plain PyTorch with recomputation, the CPU path: (N, d) hidden, (N,) targets ->
    (per-token loss fp32, lse fp32, max |u| fp32), each (N,), 0 at ignored tokens (lse aside);
    without with_max the last is empty (it costs a pass over every logit)."""
    return _ChunkedLoss.apply(hidden, weight, bias, targets, ignore_index, softcap, float(z_loss), with_max)


def materialising(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None,
                  ignore_index: int = IGNORE_INDEX, softcap: float | None = None, z_loss: float = 0.0,
                  reduction: str = "mean") -> torch.Tensor:
    """The eager formula on the full (N, V) logits, upcast to fp32 after the matmul (float64
    stays float64: the test oracle). Over no kept tokens the mean is NaN."""
    h = hidden.reshape(-1, hidden.shape[-1])
    logits = F.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype))
    logits = logits.double() if h.dtype == torch.float64 else logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    targets = targets.reshape(-1)
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
    if z_loss:
        kept = (targets != ignore_index).to(logits.dtype)
        z = (torch.logsumexp(logits, dim=-1).pow(2) * kept).sum()
        loss = loss + z_loss * (z / kept.sum() if reduction == "mean" else z)
    return loss


def _check(hidden, weight, targets, bias, ignore_index, softcap, z_loss, reduction) -> None:
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() < 2:
        raise ValueError(f"hidden: expected shape (N, d) or (B, T, d), got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape (vocab, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if bias is not None:
        check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets: expected an int64 or int32 tensor, got {got}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets: expected shape {tuple(hidden.shape[:-1])} (hidden's without d), got {tuple(targets.shape)}")
    check_same_device("hidden", hidden, weight=weight, bias=bias, targets=targets)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index: expected an int, got {ignore_index!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap: expected None or a positive float, got {softcap!r}")
    if not z_loss >= 0:
        raise ValueError(f"z_loss: expected >= 0, got {z_loss!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    vocab = weight.shape[0]
    if torch.compiler.is_compiling() or targets.device.type != "cpu":
        # No graph break, no host sync: a device assert (a RuntimeError when the step runs).
        torch._assert_async(((targets >= 0) & (targets < vocab) | (targets == ignore_index)).all(),
                            f"targets: expected values in [0, {vocab}) or ignore_index={ignore_index}")
    elif targets.numel():
        bad = (targets < 0) | (targets >= vocab)
        bad &= targets != ignore_index
        if bad.any():
            raise ValueError(f"targets: expected values in [0, {vocab}) or ignore_index={ignore_index}, "
                             f"got {targets[bad][0].item()}")


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               bias: torch.Tensor | None = None, *, ignore_index: int = IGNORE_INDEX,
                               softcap: float | None = None, z_loss: float = 0.0, reduction: str = "mean",
                               return_diagnostics: bool = False):
    """Cross-entropy of hidden @ weight.T (+ bias) against targets, without the logits.

    hidden (N, d) or (B, T, d); weight (V, d) (a tied token embedding works as it is); targets of
    hidden's shape without d, values in [0, V) or ignore_index. softcap: cap * tanh(u / cap) on
    the logits before the log-sum-exp. z_loss: weight of lse^2 per kept token. reduction "mean"
    divides by the number of kept tokens (0 kept: loss 0, gradients 0), "sum" does not.
    Returns the fp32 loss, or (loss, LossDiagnostics) with return_diagnostics.
    """
    _check(hidden, weight, targets, bias, ignore_index, softcap, z_loss, reduction)
    h = hidden.reshape(-1, hidden.shape[-1])
    if torch.is_autocast_enabled(h.device.type):  # the matmul in autocast's dtype, as F.linear's would be
        h = h.to(torch.get_autocast_dtype(h.device.type))
    t = targets.reshape(-1)
    unsupported = None
    if hidden.dtype not in KERNEL_DTYPES or weight.dtype not in KERNEL_DTYPES:
        unsupported = f"fused_linear_cross_entropy: the Triton kernels take float32, bfloat16 or float16, got {hidden.dtype}"
    softcap = None if softcap is None else float(softcap)
    if use_triton("fused_linear_cross_entropy", h, unsupported):
        from .fused_linear_cross_entropy_triton import fused_linear_cross_entropy as kernel

        losses, lse, umax = kernel(h, weight, t, bias, ignore_index, softcap, float(z_loss))
    else:
        losses, lse, umax = reference(h, weight, t, bias, ignore_index, softcap, z_loss, with_max=return_diagnostics)
    kept = t != ignore_index
    count = kept.sum().clamp(min=1).to(torch.float32)
    loss = losses.sum()
    if reduction == "mean":
        loss = loss / count
    if not return_diagnostics:
        return loss
    lse = torch.where(kept, lse, 0.0)
    return loss, LossDiagnostics(lse.sum() / count, (lse * lse).sum() / count,
                                 umax.amax() if umax.numel() else umax.new_zeros(()))
