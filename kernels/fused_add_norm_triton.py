"""Residual add, post-sublayer norm and the next pre-norm in one pass, in Triton.

Forward: y = x + LN(z) (or x + z), and n = LN_next(y) when a next norm is given; reads x and z
once, writes y and n once. Saved for backward: z (only with a post-norm), y (only with a next
norm; it is an output anyway) and the fp32 mean/rstd of each norm. Backward reads dy, dn, z, y
once and writes dx (and dz with a post-norm; without one dz is dx itself).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import backend
from .ln_common import (aot_config, cast_rtne, check_runnable, empty, launched, layer_norm_rows,
                        normalize_backward, partial_programs, rows, sum_partials, tile)


@triton.jit
def _add_norm_fwd(
    X,  # *(n_rows, width) residual stream, unit column stride
    Z,  # *(n_rows, width) sub-layer output, unit column stride
    W,  # *(width,) post-norm weight; ignored unless HAS_POST
    B,  # *(width,) post-norm bias; ignored unless HAS_POST_BIAS
    NW,  # *(width,) next norm weight; ignored unless HAS_NEXT
    NB,  # *(width,) next norm bias; ignored unless HAS_NEXT_BIAS
    Y,  # *(n_rows, width) output x + LN(z), contiguous, the promoted dtype of X and Z
    N,  # *(n_rows, width) output LN_next(y), contiguous; ignored unless HAS_NEXT
    MeanZ,  # *fp32 (n_rows,) post-norm statistics
    RstdZ,  # *fp32 (n_rows,)
    MeanY,  # *fp32 (n_rows,) next-norm statistics
    RstdY,  # *fp32 (n_rows,)
    stride_x,
    stride_z,
    n_rows,
    width,
    eps,  # float; cast to fp32 here
    HAS_POST: tl.constexpr,
    HAS_POST_BIAS: tl.constexpr,
    HAS_NEXT: tl.constexpr,
    HAS_NEXT_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.arange(0, BLOCK_N)
    row_ok = row < n_rows
    col_ok = col < width  # padded lanes of a width that is not a power of two
    ok = row_ok[:, None] & col_ok[None, :]
    row = row.to(tl.int64)
    eps = tl.cast(eps, tl.float32)

    x = tl.load(X + row[:, None] * stride_x + col[None, :], mask=ok, other=0.0).to(tl.float32)
    z = tl.load(Z + row[:, None] * stride_z + col[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_POST:
        z = layer_norm_rows(z, W, B, MeanZ, RstdZ, row, row_ok, col, col_ok, width, eps, HAS_POST_BIAS)
    # The next norm sees y as stored (rounded to the activation dtype), like its backward will.
    y = cast_rtne(x + z, Y.dtype.element_ty)
    tl.store(Y + row[:, None] * width + col[None, :], y, mask=ok)
    if HAS_NEXT:
        y = tl.where(ok, y.to(tl.float32), 0.0)
        n = layer_norm_rows(y, NW, NB, MeanY, RstdY, row, row_ok, col, col_ok, width, eps, HAS_NEXT_BIAS)
        tl.store(N + row[:, None] * width + col[None, :], cast_rtne(n, N.dtype.element_ty), mask=ok)


@triton.jit
def _add_norm_bwd(
    DY,  # *(n_rows, width) gradient of y, unit column stride
    DN,  # *(n_rows, width) gradient of n, unit column stride; ignored unless HAS_NEXT
    Z,  # *(n_rows, width) the forward's z; ignored unless HAS_POST
    Y,  # *(n_rows, width) the forward's y, contiguous; ignored unless HAS_NEXT
    W,  # *(width,) post-norm weight
    NW,  # *(width,) next norm weight
    MeanZ, RstdZ, MeanY, RstdY,  # *fp32 (n_rows,) the forward's statistics
    DX,  # *(n_rows, width) output, contiguous, dy + the next norm's input gradient
    DZ,  # *(n_rows, width) output, contiguous; written only with HAS_POST (else dz = dx)
    DW, DB,  # *fp32 (programs, width) partial sums for the post-norm's weight and bias
    DNW, DNB,  # *fp32 (programs, width) partial sums for the next norm's weight and bias
    stride_dy,
    stride_dn,
    stride_z,
    n_rows,
    width,
    HAS_POST: tl.constexpr,
    HAS_NEXT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    col = tl.arange(0, BLOCK_N)
    col_ok = col < width
    if HAS_POST:
        w = tl.load(W + col, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_NEXT:
        nw = tl.load(NW + col, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), tl.float32)
    db = tl.zeros((BLOCK_N,), tl.float32)
    dnw = tl.zeros((BLOCK_N,), tl.float32)
    dnb = tl.zeros((BLOCK_N,), tl.float32)
    for first in range(pid * BLOCK_M, n_rows, tl.num_programs(0) * BLOCK_M):
        row = first + tl.arange(0, BLOCK_M)
        row_ok = row < n_rows
        ok = row_ok[:, None] & col_ok[None, :]
        row = row.to(tl.int64)
        g = tl.load(DY + row[:, None] * stride_dy + col[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_NEXT:
            dn = tl.load(DN + row[:, None] * stride_dn + col[None, :], mask=ok, other=0.0).to(tl.float32)
            y = tl.load(Y + row[:, None] * width + col[None, :], mask=ok, other=0.0).to(tl.float32)
            mean_y = tl.load(MeanY + row, mask=row_ok, other=0.0)
            rstd_y = tl.load(RstdY + row, mask=row_ok, other=0.0)
            yhat = tl.where(ok, (y - mean_y[:, None]) * rstd_y[:, None], 0.0)
            dnw += tl.sum(dn * yhat, axis=0)
            dnb += tl.sum(dn, axis=0)
            g += normalize_backward(dn * nw[None, :], yhat, rstd_y, col_ok, width)
        if HAS_NEXT:  # otherwise dx is dy itself: the caller passes dy on, nothing to write
            tl.store(DX + row[:, None] * width + col[None, :], cast_rtne(g, DX.dtype.element_ty), mask=ok)
        if HAS_POST:
            z = tl.load(Z + row[:, None] * stride_z + col[None, :], mask=ok, other=0.0).to(tl.float32)
            mean_z = tl.load(MeanZ + row, mask=row_ok, other=0.0)
            rstd_z = tl.load(RstdZ + row, mask=row_ok, other=0.0)
            zhat = tl.where(ok, (z - mean_z[:, None]) * rstd_z[:, None], 0.0)
            dw += tl.sum(g * zhat, axis=0)
            db += tl.sum(g, axis=0)
            dz = normalize_backward(g * w[None, :], zhat, rstd_z, col_ok, width)
            tl.store(DZ + row[:, None] * width + col[None, :], cast_rtne(dz, DZ.dtype.element_ty), mask=ok)
    # Every program writes its rows, idle ones too.
    tl.store(DW + pid * width + col, dw, mask=col_ok)
    tl.store(DB + pid * width + col, db, mask=col_ok)
    tl.store(DNW + pid * width + col, dnw, mask=col_ok)
    tl.store(DNB + pid * width + col, dnb, mask=col_ok)


def aot_configs(widths=(768, 1024, 2048, 4096), act="fp32") -> list:
    """What the launchers compile at these widths, every option on (the most registers)."""
    fwd = {**{p: "*act" for p in ("X", "Z", "Y", "N")}, **{p: "*fp32" for p in ("W", "B", "NW", "NB")},
           **{p: "*fp32" for p in ("MeanZ", "RstdZ", "MeanY", "RstdY")},
           "stride_x": "i32", "stride_z": "i32", "n_rows": "i32", "width": "i32", "eps": "fp32"}
    bwd = {**{p: "*act" for p in ("DY", "DN", "Z", "Y")}, "W": "*fp32", "NW": "*fp32",
           **{p: "*fp32" for p in ("MeanZ", "RstdZ", "MeanY", "RstdY")}, "DX": "*act", "DZ": "*act",
           **{p: "*fp32" for p in ("DW", "DB", "DNW", "DNB")},
           "stride_dy": "i32", "stride_dn": "i32", "stride_z": "i32", "n_rows": "i32", "width": "i32"}
    on = {"HAS_POST": 1, "HAS_NEXT": 1}
    return [job for width in widths for job in (
        aot_config(__name__, "_add_norm_fwd", width, fwd, {**on, "HAS_POST_BIAS": 1, "HAS_NEXT_BIAS": 1}, act=act),
        aot_config(__name__, "_add_norm_bwd", width, bwd, on, backward=True, act=act))]


# ---- torch.library ops ----

@torch.library.custom_op("stableblocks::fused_add_norm_fwd", mutates_args=())
def fused_add_norm_fwd(
    x: torch.Tensor, z: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    next_weight: Optional[torch.Tensor], next_bias: Optional[torch.Tensor], eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (y, n, mean_z, rstd_z, mean_y, rstd_y); what a missing norm would produce is empty."""
    check_runnable(x)
    x2, z2 = rows(x), rows(z)
    n_rows, width = x2.shape
    dev = x.device
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, z.dtype), device=dev)
    n = torch.empty_like(y) if next_weight is not None else empty(dev)

    def stat(present):
        return torch.empty(x.shape[:-1], dtype=torch.float32, device=dev) if present else empty(dev)

    mean_z, rstd_z = stat(weight is not None), stat(weight is not None)
    mean_y, rstd_y = stat(next_weight is not None), stat(next_weight is not None)
    if n_rows:
        block_m, block_n, num_warps = tile(width)
        params = [y if t is None else t.contiguous() for t in (weight, bias, next_weight, next_bias)]
        stats = [s if s.numel() else y for s in (mean_z, rstd_z, mean_y, rstd_y)]  # absent: never touched
        _add_norm_fwd[(triton.cdiv(n_rows, block_m),)](
            x2, z2, *params, y, n if n.numel() else y, *stats, x2.stride(0), z2.stride(0), n_rows, width, eps,
            HAS_POST=int(weight is not None), HAS_POST_BIAS=int(bias is not None),
            HAS_NEXT=int(next_weight is not None), HAS_NEXT_BIAS=int(next_bias is not None),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        launched("fused_add_norm_fwd")
    return y, n, mean_z, rstd_z, mean_y, rstd_y


@fused_add_norm_fwd.register_fake
def _(x, z, weight, bias, next_weight, next_bias, eps):
    def stat(present):
        return torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device) if present else empty(x.device)

    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, z.dtype), device=x.device)
    n = torch.empty_like(y) if next_weight is not None else empty(x.device)
    post, nxt = weight is not None, next_weight is not None
    return y, n, stat(post), stat(post), stat(nxt), stat(nxt)


@torch.library.custom_op("stableblocks::fused_add_norm_bwd", mutates_args=())
def fused_add_norm_bwd(
    dy: torch.Tensor, dn: Optional[torch.Tensor], z: Optional[torch.Tensor], y: torch.Tensor,
    weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], next_weight: Optional[torch.Tensor],
    next_bias: Optional[torch.Tensor], mean_z: torch.Tensor, rstd_z: torch.Tensor, mean_y: torch.Tensor,
    rstd_y: torch.Tensor, x_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dz, dweight, dbias, dnext_weight, dnext_bias); dz is empty without a post-norm
    (it equals dx), each weight gradient empty where that weight is absent.

    z is given with a post-norm, dn with a next norm; y is the forward's output (or, without a
    next norm, any tensor of its shape). dx is made in x_dtype: under autocast the residual x is
    fp32 beside a bf16 z, and its gradient must not be rounded to bf16."""
    check_runnable(y)
    n_rows, width = y.numel() // y.shape[-1], y.shape[-1]
    dev = y.device
    # Without a next norm dx is dy: empty here, the autograd backward passes dy on.
    dx = torch.empty(y.shape, dtype=x_dtype, device=dev) if next_weight is not None else empty(dev)
    dz = torch.empty(y.shape, dtype=z.dtype, device=dev) if weight is not None else empty(dev)
    block_m, block_n, num_warps = tile(width, backward=True)
    programs = partial_programs(n_rows, block_m, dev)
    # Every program writes its partial rows; with no rows nothing runs, so start from zeros then.
    parts = [(torch.empty if n_rows else torch.zeros)(programs, width, dtype=torch.float32, device=dev)
             for _ in range(4)]
    if n_rows:
        dy2 = rows(dy)
        dn2 = rows(dn) if dn is not None else dx
        z2 = rows(z) if z is not None else dx
        _add_norm_bwd[(programs,)](
            dy2, dn2, z2, y, *(dx if t is None else t.contiguous() for t in (weight, next_weight)),
            *(s if s.numel() else dx for s in (mean_z, rstd_z, mean_y, rstd_y)), dx, dz if dz.numel() else dx,
            *parts, dy2.stride(0), dn2.stride(0), z2.stride(0), n_rows, width,
            HAS_POST=int(weight is not None), HAS_NEXT=int(next_weight is not None),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
        launched("fused_add_norm_bwd")
    return (dx, dz, sum_partials(parts[0], weight), sum_partials(parts[1], bias),
            sum_partials(parts[2], next_weight), sum_partials(parts[3], next_bias))


@fused_add_norm_bwd.register_fake
def _(dy, dn, z, y, weight, bias, next_weight, next_bias, mean_z, rstd_z, mean_y, rstd_y, x_dtype):
    dx = torch.empty(y.shape, dtype=x_dtype, device=y.device) if next_weight is not None else empty(y.device)
    grads = [empty(y.device) if t is None else torch.empty_like(t) for t in (weight, bias, next_weight, next_bias)]
    return dx, torch.empty(y.shape, dtype=z.dtype, device=y.device) if weight is not None else empty(y.device), *grads


def _setup_context(ctx, inputs, output):
    x, z, weight, bias, next_weight, next_bias, _ = inputs
    y, n, *stats = output
    post, nxt = weight is not None, next_weight is not None
    # z only for the post-norm's backward, y only for the next norm's.
    ctx.save_for_backward(z if post else None, y if nxt else None, weight, bias, next_weight, next_bias, *stats)
    ctx.mark_non_differentiable(*stats)
    ctx.x_dtype = x.dtype


def _backward(ctx, dy, dn, *_dstats):
    z, y, weight, bias, next_weight, next_bias, *stats = ctx.saved_tensors
    if weight is None and next_weight is None:
        return dy, dy, None, None, None, None, None  # y = x + z: nothing to compute
    # Without a next norm y is not needed, only a tensor of its shape: z, there with the post-norm.
    dx, dz, dw, db, dnw, dnb = fused_add_norm_bwd(
        dy, dn if next_weight is not None else None, z, y if y is not None else z, weight, bias, next_weight,
        next_bias, *stats, ctx.x_dtype)
    if next_weight is None:
        dx = dy.to(ctx.x_dtype)
    return (dx, dz if weight is not None else dx, *(None if t is None else g for t, g in
                                                   ((weight, dw), (bias, db), (next_weight, dnw), (next_bias, dnb))),
            None)


fused_add_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_add_norm(x: torch.Tensor, z: torch.Tensor, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, *, next_weight: Optional[torch.Tensor] = None,
                   next_bias: Optional[torch.Tensor] = None, eps: float = 1e-5):
    """Arguments already validated by kernels/fused_add_norm.py. -> y, or (y, n) with a next norm."""
    y, n, *_ = fused_add_norm_fwd(x, z, weight, bias, next_weight, next_bias, eps)
    return y if next_weight is None else (y, n)


backend.KERNELS.add("fused_add_norm")
