"""LayerNorm in Triton: forward saves x's per-row mean and rstd (fp32); backward recomputes xhat.

Layers: kernels -> launchers -> torch.library ops with autograd -> layer_norm(), the function
kernels/layer_norm.py dispatches to.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import backend
from .ln_common import (aot_config, cast_rtne, check_runnable, empty, launched, layer_norm_rows,
                        normalize_backward, partial_programs, rows, sum_partials, tile)


@triton.jit
def _layer_norm_fwd(
    X,  # *(n_rows, width) input, unit column stride
    Y,  # *(n_rows, width) output, contiguous, X's dtype
    W,  # *(width,) weight, any float dtype
    B,  # *(width,) bias; ignored unless HAS_BIAS
    Mean,  # *fp32 (n_rows,) saved for backward
    Rstd,  # *fp32 (n_rows,) saved for backward
    stride_x,  # elements between rows of X
    n_rows,
    width,
    eps,  # float; cast to fp32 here
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # width rounded up to a power of two
):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.arange(0, BLOCK_N)
    row_ok = row < n_rows
    col_ok = col < width  # padded lanes of a width that is not a power of two
    ok = row_ok[:, None] & col_ok[None, :]
    row = row.to(tl.int64)

    x = tl.load(X + row[:, None] * stride_x + col[None, :], mask=ok, other=0.0).to(tl.float32)
    y = layer_norm_rows(x, W, B, Mean, Rstd, row, row_ok, col, col_ok, width, tl.cast(eps, tl.float32), HAS_BIAS)
    tl.store(Y + row[:, None] * width + col[None, :], cast_rtne(y, Y.dtype.element_ty), mask=ok)


@triton.jit
def _layer_norm_bwd(
    DY,  # *(n_rows, width) gradient of the output, unit column stride
    X,  # *(n_rows, width) the forward's input, unit column stride
    W,  # *(width,) weight
    Mean,  # *fp32 (n_rows,)
    Rstd,  # *fp32 (n_rows,)
    DX,  # *(n_rows, width) output, contiguous, X's dtype
    DW,  # *fp32 (programs, width): this program's partial sum of dy * xhat
    DB,  # *fp32 (programs, width): this program's partial sum of dy
    stride_dy,
    stride_x,
    n_rows,
    width,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    col = tl.arange(0, BLOCK_N)
    col_ok = col < width
    w = tl.load(W + col, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), tl.float32)
    db = tl.zeros((BLOCK_N,), tl.float32)
    for first in range(pid * BLOCK_M, n_rows, tl.num_programs(0) * BLOCK_M):
        row = first + tl.arange(0, BLOCK_M)
        row_ok = row < n_rows
        ok = row_ok[:, None] & col_ok[None, :]
        row = row.to(tl.int64)
        x = tl.load(X + row[:, None] * stride_x + col[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + row[:, None] * stride_dy + col[None, :], mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + row, mask=row_ok, other=0.0)
        xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        dx = normalize_backward(dy * w[None, :], xhat, rstd, col_ok, width)
        tl.store(DX + row[:, None] * width + col[None, :], cast_rtne(dx, DX.dtype.element_ty), mask=ok)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    # Every program writes its row, idle ones too: the buffers are torch.empty.
    tl.store(DW + pid * width + col, dw, mask=col_ok)
    tl.store(DB + pid * width + col, db, mask=col_ok)


def aot_configs(widths=(768, 1024, 2048, 4096), act="fp32") -> list:
    """What the launchers compile at these widths (fp32 weights, activations of type `act`)."""
    fwd = {"X": "*act", "Y": "*act", "W": "*fp32", "B": "*fp32", "Mean": "*fp32", "Rstd": "*fp32",
           "stride_x": "i32", "n_rows": "i32", "width": "i32", "eps": "fp32"}
    bwd = {"DY": "*act", "X": "*act", "W": "*fp32", "Mean": "*fp32", "Rstd": "*fp32", "DX": "*act", "DW": "*fp32",
           "DB": "*fp32", "stride_dy": "i32", "stride_x": "i32", "n_rows": "i32", "width": "i32"}
    return [job for width in widths for job in (
        aot_config(__name__, "_layer_norm_fwd", width, fwd, {"HAS_BIAS": 1}, act=act),
        aot_config(__name__, "_layer_norm_bwd", width, bwd, {}, backward=True, act=act))]


# ---- torch.library ops: opaque to torch.compile, which therefore works without a GPU driver ----

@torch.library.custom_op("stableblocks::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (y, mean, rstd); mean and rstd are fp32 of shape x.shape[:-1]."""
    check_runnable(x)
    x2 = rows(x)
    n_rows, width = x2.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if n_rows:
        weight = weight.contiguous()
        block_m, block_n, num_warps = tile(width)
        _layer_norm_fwd[(triton.cdiv(n_rows, block_m),)](
            x2, y, weight, weight if bias is None else bias.contiguous(), mean, rstd, x2.stride(0), n_rows, width,
            eps, HAS_BIAS=int(bias is not None), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        launched("layer_norm_fwd")
    return y, mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    mean = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), mean, torch.empty_like(mean)


@torch.library.custom_op("stableblocks::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dweight, dbias); dbias is empty without a bias."""
    check_runnable(x)
    x2, dy2 = rows(x), rows(dy)
    n_rows, width = x2.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_m, block_n, num_warps = tile(width, backward=True)
    programs = partial_programs(n_rows, block_m, x.device)
    # Every program writes its partial row; with no rows nothing runs, so start from zeros then.
    dw = (torch.empty if n_rows else torch.zeros)(programs, width, dtype=torch.float32, device=x.device)
    db = torch.empty_like(dw) if n_rows else torch.zeros_like(dw)
    if n_rows:
        _layer_norm_bwd[(programs,)](
            dy2, x2, weight.contiguous(), mean, rstd, dx, dw, db, dy2.stride(0), x2.stride(0), n_rows, width,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        launched("layer_norm_bwd")
    return dx, sum_partials(dw, weight), sum_partials(db, bias)


@layer_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd):
    db = empty(x.device) if bias is None else torch.empty_like(bias)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight), db


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = layer_norm_bwd(dy, x, weight, bias, mean, rstd)
    return dx, dw, None if bias is None else db, None


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5) -> torch.Tensor:
    """Arguments already validated by kernels/layer_norm.py."""
    return layer_norm_fwd(x, weight, bias, eps)[0]


backend.KERNELS.add("layer_norm")
