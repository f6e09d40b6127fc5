"""Triton kernels for causal (or full) attention with fused per-head QK-norm / QKV-norm and soft-cap.

FlashAttention-2's algorithm with three additions inside the tiles:
- LayerNorm over D (fp32 statistics, one (D,) weight and bias shared by all heads) of the Q tile
  once per program, and of each K (and V, for QKV-norm) tile as it is loaded;
- the soft-cap `cap * tanh(s / cap)` on the scaled logits, before the causal mask;
- in backward, the cap's derivative `1 - t^2` (t recomputed) and the LayerNorm backward to the raw
  q, k, v, with the weight/bias gradients as fp32 partial sums per program summed in a fixed order.

Forward saves only q, k, v (raw, pre-norm), o with an fp16 residual of its rounding (none for fp32)
and one fp32 log-sum-exp per row: O(T) memory.

Where block_sizes sets HEAD_ROWS (bf16/fp16 at D > 128 on sm_90a), the backward kernels accumulate
dk^T, dv^T and dq^T, and the norms run outside them as the LayerNorm kernels (_bwd_norms_outside).

Layers, as in every kernel file: kernels -> launchers (block sizes) -> torch.library ops
(`fused_attention_fwd`, `fused_attention_bwd`, each launching its kernels) with the autograd rule
(`_setup_context`, `_backward`) -> `fused_attention()`, which kernels/fused_attention.py calls after
validating its arguments.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import backend
from .layer_norm_triton import layer_norm_bwd, layer_norm_fwd
from .ln_common import cast_rtne, check_runnable, launched, normalize, normalize_backward


# ----------------------------------------------------------------------------------------------
# Tile helpers


@triton.jit
def _tanh(x):
    """tanh in fp32 to a few ulp, from exp2 (Triton has no tanh the interpreter can run too).

    (1 - e^-2|x|) / (1 + e^-2|x|) cancels near 0, where the cap is mostly used (|s| << cap), so
    small |x| takes the odd Taylor series instead (its first dropped term is < 1e-9 there).
    """
    ax = tl.abs(x)
    e = tl.exp2(-2.8853900817779268 * ax)  # e^(-2|x|)
    far = (1.0 - e) / (1.0 + e)
    xs = tl.minimum(ax, 0.3)
    x2 = xs * xs
    near = xs * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * (0.021869488536155203 + x2 * -0.008863235529902197)))))
    t = tl.where(ax < 0.3, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits(qk, scale, softcap, SOFTCAP: tl.constexpr):
    """Scores in log2 units (for exp2) from q.k, and t = tanh(scale q.k / cap) when capped."""
    if SOFTCAP:
        t = _tanh(qk * (scale / softcap))
        return t * (softcap * 1.4426950408889634), t
    else:
        return qk * (scale * 1.4426950408889634), qk


@triton.jit
def _dot(a, b, acc, DOT_UPCAST: tl.constexpr):
    """a @ b (+ acc) accumulated in fp32, on tensor cores. fp32 operands take 3xTF32: each splits
    into a TF32 high part and a TF32 remainder, and hi*hi + hi*lo + lo*hi recovers ~fp32 products
    (plain TF32 misses SPEC.md's fp32 tolerance ~100x; emulated 3xTF32 is within it, like IEEE
    fp32, which spills registers at these tiles). bf16/fp16 operands ignore input_precision.

    DOT_UPCAST (interpreter only): Triton's interpreter multiplies bf16 tiles as their raw uint16
    bits (triton-lang/triton#11584), so bf16 operands go in as exact fp32 copies: the same products
    and fp32 accumulation a GPU's bf16 MMA computes.
    """
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="tf32x3")


@triton.jit
def _cast(x, dtype: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """An fp32 tile in `dtype`, rounded to nearest even as a GPU converts. Under the interpreter
    (DOT_UPCAST) bf16 conversion truncates instead: cast_rtne rounds there, so the CPU tests see
    the GPU's values (and the backward recomputes the forward's tiles bit for bit)."""
    if DOT_UPCAST:
        return cast_rtne(x, dtype)
    else:
        return x.to(dtype)


@triton.jit
def _lanes(offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Which lanes of a BLOCK_D-wide tile hold data; a constant when D is a power of two, so the
    masks and selects on lanes fold away there."""
    if D == BLOCK_D:
        return tl.full([BLOCK_D], 1, tl.int1)
    else:
        return offs_d < D


@triton.jit
def _safe_eps(eps, row_ok):
    """eps for rows of data; 1 for rows outside the sequence (loaded as zeros, so zero variance),
    which with eps = 0 would otherwise normalise 0 * inf = NaN into the tiles' matmuls."""
    return tl.where(row_ok, eps, 1.0)


@triton.jit
def _normed(x, W, B, offs_d, d_ok, row_ok, eps, D: tl.constexpr, NORM: tl.constexpr):
    """LayerNorm over the rows of an fp32 (rows, BLOCK_D) tile when NORM, else the tile itself.
    Lanes past D (a width that is not a power of two) hold 0 in and out and stay out of the
    statistics (ln_common.normalize)."""
    if NORM:
        _, _, xhat = normalize(x, d_ok, D, _safe_eps(eps, row_ok))
        w = tl.load(W + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        b = tl.load(B + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        return xhat * w[None, :] + b[None, :]
    else:
        return x


@triton.jit
def _norm_backward(dy, x, W, DNORM, row, n_rows, offs_d, d_ok, row_ok, eps, D: tl.constexpr):
    """LayerNorm backward for fp32 (rows, BLOCK_D) tiles: returns dx, and stores this tile's fp32
    partial sums of dweight and dbias at row `row` of DNORM ((2, n_rows, D): dweight rows, then
    dbias rows). Rows outside the sequence come in with dy = 0 and x = 0: they add nothing."""
    _, rstd, xhat = normalize(x, d_ok, D, _safe_eps(eps, row_ok))
    w = tl.load(W + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    row = row.to(tl.int64)
    tl.store(DNORM + row * D + offs_d, tl.sum(dy * xhat, axis=0), mask=d_ok)
    tl.store(DNORM + (n_rows + row) * D + offs_d, tl.sum(dy, axis=0), mask=d_ok)
    return normalize_backward(dy * w[None, :], xhat, rstd, d_ok, D)


# ----------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _attention_fwd_tiles(
    acc, l_i, m_i,  # running output (fp32), softmax denominator and row max (log2 units)
    qk_max,  # running row max of the raw q.k (only kept with MAX_LOGIT and SOFTCAP)
    q,  # (BLOCK_M, D) normalised Q tile in the input dtype
    K, V,  # K and V at this (batch, head)
    KW, KB, VW, VB,  # (D,) norm weight/bias of k and v
    stride_kt, stride_vt,  # row (time) strides of k and v
    offs_m, offs_d, d_ok,  # query row indices, head-width lanes and which of them are < D
    lo, hi,  # key range of this call, lo a multiple of BLOCK_N
    T, scale, softcap, eps,
    D: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, K_NORM: tl.constexpr, V_NORM: tl.constexpr,
    MASKED: tl.constexpr,  # 1 for tiles crossing the diagonal or the end of the sequence
    MAX_LOGIT: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_in_seq = offs_n < T
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=key_in_seq[:, None] & d_ok[None, :], other=0.0)
        k = _cast(_normed(k.to(tl.float32), KW, KB, offs_d, d_ok, key_in_seq, eps, D, K_NORM), q.dtype, DOT_UPCAST)
        qk = _dot(q, tl.trans(k), None, DOT_UPCAST)
        s, _ = _logits(qk, scale, softcap, SOFTCAP)
        if MASKED:
            visible = key_in_seq[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(visible, s, float("-inf"))
            if MAX_LOGIT and SOFTCAP:
                qk_max = tl.maximum(qk_max, tl.max(tl.where(visible, qk, float("-inf")), axis=1))
        elif MAX_LOGIT and SOFTCAP:
            qk_max = tl.maximum(qk_max, tl.max(qk, axis=1))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=key_in_seq[:, None] & d_ok[None, :], other=0.0)
        v = _cast(_normed(v.to(tl.float32), VW, VB, offs_d, d_ok, key_in_seq, eps, D, V_NORM), q.dtype, DOT_UPCAST)
        acc = _dot(_cast(p, q.dtype, DOT_UPCAST), v, acc * alpha[:, None], DOT_UPCAST)
        m_i = m_new
    return acc, l_i, m_i, qk_max


@triton.jit
def _attention_fwd(
    Q, K, V,  # (B, T, H, D) raw inputs, last dimension contiguous
    QW, QB, KW, KB, VW, VB,  # (D,) LayerNorm weight and bias of q, k, v (unused when the norm is off)
    O,  # (B, T, H, D) output
    O_RES,  # (B, T, H, D) fp16: o minus o rounded to O's dtype, for the backward (strides of O); with RESIDUAL
    LSE,  # (B, H, T) fp32: log2 of each row's softmax denominator, for the backward
    MAXLOGIT,  # (programs,) fp32: each program's max raw logit, written only with MAX_LOGIT
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    T, H,  # sequence length, heads
    scale, softcap, eps,  # logit scale, soft-cap (unused unless SOFTCAP), LayerNorm eps
    D: tl.constexpr,  # head width: a multiple of 8 from 16 to 256
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two: the tiles' width
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # query rows per program, keys per tile
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
    Q_NORM: tl.constexpr, K_NORM: tl.constexpr, V_NORM: tl.constexpr,
    MAX_LOGIT: tl.constexpr,  # 1: also write the max raw logit over this program's visible scores
    RESIDUAL: tl.constexpr,  # 1 when O is bf16/fp16: store what its rounding lost
    DOT_UPCAST: tl.constexpr,  # 1 under the interpreter for bf16 (see _dot)
):
    # One program per (batch * head, query block) on a 1-D grid: no 65535 limit on B * H.
    n_blocks = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // n_blocks
    start_m = (pid % n_blocks) * BLOCK_M
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    scale = tl.cast(scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    eps = tl.cast(eps, tl.float32)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _lanes(offs_d, D, BLOCK_D)
    row_in_seq = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_in_seq[:, None] & d_ok[None, :], other=0.0)
    q = _cast(_normed(q.to(tl.float32), QW, QB, offs_d, d_ok, row_in_seq, eps, D, Q_NORM), Q.dtype.element_ty, DOT_UPCAST)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    # Key tiles before `full_end` are visible to every row of this block and inside the sequence;
    # the rest (the diagonal, the sequence's end) are masked.
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, T)
        full_end = (tl.minimum(start_m + 1, T) // BLOCK_N) * BLOCK_N
    else:
        hi = T
        full_end = (T // BLOCK_N) * BLOCK_N
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    acc, l_i, m_i, qk_max = _attention_fwd_tiles(acc, l_i, m_i, qk_max, q, K, V, KW, KB, VW, VB, stride_kt, stride_vt,
                                            offs_m, offs_d, d_ok, 0, full_end, T, scale, softcap, eps,
                                            D, BLOCK_N, CAUSAL, SOFTCAP, K_NORM, V_NORM, 0, MAX_LOGIT, DOT_UPCAST)
    acc, l_i, m_i, qk_max = _attention_fwd_tiles(acc, l_i, m_i, qk_max, q, K, V, KW, KB, VW, VB, stride_kt, stride_vt,
                                            offs_m, offs_d, d_ok, full_end, hi, T, scale, softcap, eps,
                                            D, BLOCK_N, CAUSAL, SOFTCAP, K_NORM, V_NORM, 1, MAX_LOGIT, DOT_UPCAST)
    if MAX_LOGIT:
        # The raw scaled logit before any cap (scale > 0, so the max commutes with it). Without a
        # cap the softmax's own row max (log2 units) is that logit: no extra work per tile.
        if SOFTCAP:
            row_max = qk_max * scale
        else:
            row_max = m_i * 0.6931471805599453
        tl.store(MAXLOGIT + pid, tl.max(tl.where(row_in_seq, row_max, float("-inf")), axis=0))
    o = acc / l_i[:, None]
    o_offs = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    o_out = _cast(o, O.dtype.element_ty, DOT_UPCAST)
    tl.store(O + o_offs, o_out, mask=row_in_seq[:, None] & d_ok[None, :])
    if RESIDUAL:
        tl.store(O_RES + o_offs, (o - o_out.to(tl.float32)).to(tl.float16), mask=row_in_seq[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=row_in_seq)


# ----------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _attention_bwd_dkdv_tiles(
    dk, dv,  # (BLOCK_N, D) fp32 accumulators for the normalised k and v
    k, v,  # (BLOCK_N, D) normalised K and V tiles in the input dtype
    Q, DO, LSE, DELTA,  # q, do at this (batch, head); LSE and DELTA at this row of (B * H, T)
    QW, QB,  # (D,) norm weight/bias of q
    stride_qt, stride_dot,
    offs_n, offs_d, d_ok,  # key row indices, head-width lanes and which of them are < D
    lo, hi,  # query range of this call, lo a multiple of BLOCK_M
    T, scale, softcap, eps,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, Q_NORM: tl.constexpr,
    MASKED: tl.constexpr,  # 1 for tiles crossing the diagonal, or keys past the end of the sequence
    DOT_UPCAST: tl.constexpr,
):
    key_in_seq = offs_n < T
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_in_seq = offs_m < T
        q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_in_seq[:, None] & d_ok[None, :], other=0.0)
        q = _cast(_normed(q.to(tl.float32), QW, QB, offs_d, d_ok, row_in_seq, eps, D, Q_NORM), k.dtype, DOT_UPCAST)
        do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_in_seq[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(LSE + offs_m, mask=row_in_seq, other=float("inf"))  # p = 0 past the end
        delta = tl.load(DELTA + offs_m, mask=row_in_seq, other=0.0)
        # Transposed scores (keys x queries), so dk and dv accumulate row by row. In fp32 they are
        # the forward's q k^T transposed, the same sums in the same order: k q^T can round a logit
        # an ulp apart, and past a cap of 50 (~72 in log2 units) that ulp alone moves p by several
        # times PyTorch's error, which keeps its forward's p. In bf16/fp16 the inputs' rounding
        # dwarfs it, and the transpose would cost registers.
        if k.dtype == tl.float32:
            s, t = _logits(tl.trans(_dot(q, tl.trans(k), None, DOT_UPCAST)), scale, softcap, SOFTCAP)
        else:
            s, t = _logits(_dot(k, tl.trans(q), None, DOT_UPCAST), scale, softcap, SOFTCAP)
        p = tl.exp2(s - lse[None, :])
        if MASKED:
            visible = key_in_seq[:, None]
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :])
            p = tl.where(visible, p, 0.0)
        dv = _dot(_cast(p, do.dtype, DOT_UPCAST), do, dv, DOT_UPCAST)
        dp = _dot(v, tl.trans(do), None, DOT_UPCAST)
        ds = p * (dp - delta[None, :])  # gradient of the capped logits
        if SOFTCAP:
            ds = ds * (1.0 - t * t)  # through cap * tanh(s / cap)
        dk = _dot(_cast(ds, q.dtype, DOT_UPCAST), q, dk, DOT_UPCAST)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_tiles_head_rows(
    dkt, dvt,  # (BLOCK_D, BLOCK_N) fp32 accumulators of the normalised k and v, transposed
    k, v,  # (BLOCK_N, BLOCK_D) normalised K and V tiles in the input dtype
    Q, DO, LSE, DELTA, QW, QB, stride_qt, stride_dot, offs_n, offs_d, d_ok, lo, hi, T, scale, softcap, eps,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, Q_NORM: tl.constexpr, MASKED: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """_attention_bwd_dkdv_tiles with the head dimension on the accumulators' rows: dk^T += q^T ds,
    dv^T += do^T p. A wgmma takes 64 rows a warp group; here D supplies them, so a program's keys
    can stay few (its two fp32 accumulators small) while the queries run 64 a tile."""
    key_in_seq = offs_n < T
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_in_seq = offs_m < T
        q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_in_seq[:, None] & d_ok[None, :], other=0.0)
        q = _cast(_normed(q.to(tl.float32), QW, QB, offs_d, d_ok, row_in_seq, eps, D, Q_NORM), k.dtype, DOT_UPCAST)
        do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_in_seq[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(LSE + offs_m, mask=row_in_seq, other=float("inf"))  # p = 0 past the end
        delta = tl.load(DELTA + offs_m, mask=row_in_seq, other=0.0)
        s, t = _logits(_dot(q, tl.trans(k), None, DOT_UPCAST), scale, softcap, SOFTCAP)  # (queries, keys)
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            visible = key_in_seq[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(visible, p, 0.0)
        dvt = _dot(tl.trans(do), _cast(p, do.dtype, DOT_UPCAST), dvt, DOT_UPCAST)
        dp = _dot(do, tl.trans(v), None, DOT_UPCAST)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dkt = _dot(tl.trans(q), _cast(ds, q.dtype, DOT_UPCAST), dkt, DOT_UPCAST)
    return dkt, dvt


@triton.jit
def _attention_bwd_dkdv(
    Q, K, V, DO,  # (B, T, H, D) raw inputs and the output's gradient, last dimension contiguous
    LSE, DELTA,  # (B, H, T) fp32 from the forward and from _attention_bwd_dq
    QW, QB, KW, KB, VW, VB,  # (D,) LayerNorm weight and bias of q, k, v (unused when the norm is off)
    DK, DV,  # (B, T, H, D) gradients of the raw k and v
    DNORM_K, DNORM_V,  # (2, programs, D) fp32 partial sums of k's and v's dweight, dbias
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_gb, stride_gt, stride_gh,  # strides of DK and DV (both contiguous)
    T, H,
    scale, softcap, eps,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # query rows per tile, keys per program
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
    Q_NORM: tl.constexpr, K_NORM: tl.constexpr, V_NORM: tl.constexpr,
    HEAD_ROWS: tl.constexpr,  # 1: accumulate dk^T and dv^T (see _attention_bwd_dkdv_tiles_head_rows)
    DOT_UPCAST: tl.constexpr,  # 1 under the interpreter for bf16 (see _dot)
):
    # One program per (batch * head, key block), looping over the query blocks that see it.
    n_blocks = tl.cdiv(T, BLOCK_N)
    pid = tl.program_id(0)
    bh = pid // n_blocks
    start_n = (pid % n_blocks) * BLOCK_N
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    scale = tl.cast(scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    eps = tl.cast(eps, tl.float32)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _lanes(offs_d, D, BLOCK_D)
    key_in_seq = offs_n < T
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    k_ptrs = K + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :]
    k = tl.load(k_ptrs, mask=key_in_seq[:, None] & d_ok[None, :], other=0.0)
    k = _cast(_normed(k.to(tl.float32), KW, KB, offs_d, d_ok, key_in_seq, eps, D, K_NORM), K.dtype.element_ty, DOT_UPCAST)
    v = tl.load(v_ptrs, mask=key_in_seq[:, None] & d_ok[None, :], other=0.0)
    v = _cast(_normed(v.to(tl.float32), VW, VB, offs_d, d_ok, key_in_seq, eps, D, V_NORM), V.dtype.element_ty, DOT_UPCAST)

    Q += b * stride_qb + h * stride_qh
    DO += b * stride_dob + h * stride_doh
    LSE += bh.to(tl.int64) * T
    DELTA += bh.to(tl.int64) * T
    # Query blocks from `mid` on see every key of this block; those before it (the diagonal) are
    # masked, and so is everything for a key block that runs past the end of the sequence. Query
    # rows past the end need no mask: they load lse = +inf and do = 0, so they add exactly 0.
    t_pad = tl.cdiv(T, BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, t_pad)
    else:
        lo = 0
        mid = 0
    if start_n + BLOCK_N <= T:
        full_end = t_pad
    else:
        full_end = mid
    if HEAD_ROWS:
        dkt = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
        dvt = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
        dkt, dvt = _attention_bwd_dkdv_tiles_head_rows(dkt, dvt, k, v, Q, DO, LSE, DELTA, QW, QB, stride_qt, stride_dot,
                                                   offs_n, offs_d, d_ok, lo, mid, T, scale, softcap, eps,
                                                   D, BLOCK_M, CAUSAL, SOFTCAP, Q_NORM, 1, DOT_UPCAST)
        dkt, dvt = _attention_bwd_dkdv_tiles_head_rows(dkt, dvt, k, v, Q, DO, LSE, DELTA, QW, QB, stride_qt, stride_dot,
                                                   offs_n, offs_d, d_ok, mid, full_end, T, scale, softcap, eps,
                                                   D, BLOCK_M, CAUSAL, SOFTCAP, Q_NORM, 0, DOT_UPCAST)
        dkt, dvt = _attention_bwd_dkdv_tiles_head_rows(dkt, dvt, k, v, Q, DO, LSE, DELTA, QW, QB, stride_qt, stride_dot,
                                                   offs_n, offs_d, d_ok, full_end, t_pad, T, scale, softcap, eps,
                                                   D, BLOCK_M, CAUSAL, SOFTCAP, Q_NORM, 1, DOT_UPCAST)
        dk = tl.trans(dkt)
        dv = tl.trans(dvt)
    else:
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dk, dv = _attention_bwd_dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, QW, QB, stride_qt, stride_dot,
                                      offs_n, offs_d, d_ok, lo, mid, T, scale, softcap, eps,
                                      D, BLOCK_M, CAUSAL, SOFTCAP, Q_NORM, 1, DOT_UPCAST)
        dk, dv = _attention_bwd_dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, QW, QB, stride_qt, stride_dot,
                                      offs_n, offs_d, d_ok, mid, full_end, T, scale, softcap, eps,
                                      D, BLOCK_M, CAUSAL, SOFTCAP, Q_NORM, 0, DOT_UPCAST)
        dk, dv = _attention_bwd_dkdv_tiles(dk, dv, k, v, Q, DO, LSE, DELTA, QW, QB, stride_qt, stride_dot,
                                      offs_n, offs_d, d_ok, full_end, t_pad, T, scale, softcap, eps,
                                      D, BLOCK_M, CAUSAL, SOFTCAP, Q_NORM, 1, DOT_UPCAST)
    dk = tl.where(key_in_seq[:, None], dk * scale, 0.0)
    dv = tl.where(key_in_seq[:, None], dv, 0.0)
    if K_NORM:
        k_raw = tl.load(k_ptrs, mask=key_in_seq[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        dk = _norm_backward(dk, k_raw, KW, DNORM_K, pid, tl.num_programs(0), offs_d, d_ok, key_in_seq, eps, D)
    if V_NORM:
        v_raw = tl.load(v_ptrs, mask=key_in_seq[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        dv = _norm_backward(dv, v_raw, VW, DNORM_V, pid, tl.num_programs(0), offs_d, d_ok, key_in_seq, eps, D)
    g_offs = b * stride_gb + h * stride_gh + offs_n[:, None] * stride_gt + offs_d[None, :]
    tl.store(DK + g_offs, _cast(dk, DK.dtype.element_ty, DOT_UPCAST), mask=key_in_seq[:, None] & d_ok[None, :])
    tl.store(DV + g_offs, _cast(dv, DV.dtype.element_ty, DOT_UPCAST), mask=key_in_seq[:, None] & d_ok[None, :])


@triton.jit
def _attention_bwd_dq_tiles(
    dq,  # (BLOCK_M, D) fp32 accumulator for the normalised q
    q, do,  # (BLOCK_M, D) normalised Q tile and its rows of do, in the input dtype
    lse, delta,  # (BLOCK_M,) fp32 rows of LSE and DELTA
    K, V,  # K and V at this (batch, head)
    KW, KB, VW, VB,
    stride_kt, stride_vt,
    offs_m, offs_d, d_ok,
    lo, hi,  # key range of this call, lo a multiple of BLOCK_N
    T, scale, softcap, eps,
    D: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, K_NORM: tl.constexpr, V_NORM: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_in_seq = offs_n < T
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=key_in_seq[:, None] & d_ok[None, :], other=0.0)
        k = _cast(_normed(k.to(tl.float32), KW, KB, offs_d, d_ok, key_in_seq, eps, D, K_NORM), q.dtype, DOT_UPCAST)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=key_in_seq[:, None] & d_ok[None, :], other=0.0)
        v = _cast(_normed(v.to(tl.float32), VW, VB, offs_d, d_ok, key_in_seq, eps, D, V_NORM), q.dtype, DOT_UPCAST)
        s, t = _logits(_dot(q, tl.trans(k), None, DOT_UPCAST), scale, softcap, SOFTCAP)
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            visible = key_in_seq[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(visible, p, 0.0)
        dp = _dot(do, tl.trans(v), None, DOT_UPCAST)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _dot(_cast(ds, q.dtype, DOT_UPCAST), k, dq, DOT_UPCAST)
    return dq


@triton.jit
def _attention_bwd_dq_tiles_head_rows(
    dqt,  # (BLOCK_D, BLOCK_M) fp32 accumulator of the normalised q, transposed
    q, do, lse, delta, K, V, KW, KB, VW, VB, stride_kt, stride_vt, offs_m, offs_d, d_ok, lo, hi, T, scale, softcap, eps,
    D: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, K_NORM: tl.constexpr, V_NORM: tl.constexpr, MASKED: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """_attention_bwd_dq_tiles with the head dimension on the accumulator's rows: dq^T += k^T ds^T,
    the scores as (keys, queries) tiles (see _attention_bwd_dkdv_tiles_head_rows)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_in_seq = offs_n < T
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=key_in_seq[:, None] & d_ok[None, :], other=0.0)
        k = _cast(_normed(k.to(tl.float32), KW, KB, offs_d, d_ok, key_in_seq, eps, D, K_NORM), q.dtype, DOT_UPCAST)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=key_in_seq[:, None] & d_ok[None, :], other=0.0)
        v = _cast(_normed(v.to(tl.float32), VW, VB, offs_d, d_ok, key_in_seq, eps, D, V_NORM), q.dtype, DOT_UPCAST)
        s, t = _logits(_dot(k, tl.trans(q), None, DOT_UPCAST), scale, softcap, SOFTCAP)  # (keys, queries)
        p = tl.exp2(s - lse[None, :])
        if MASKED:
            visible = key_in_seq[:, None]
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :])
            p = tl.where(visible, p, 0.0)
        dp = _dot(v, tl.trans(do), None, DOT_UPCAST)
        ds = p * (dp - delta[None, :])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dqt = _dot(tl.trans(k), _cast(ds, q.dtype, DOT_UPCAST), dqt, DOT_UPCAST)
    return dqt


@triton.jit
def _attention_bwd_dq(
    Q, K, V, DO,  # (B, T, H, D) raw inputs and the output's gradient, last dimension contiguous
    O, O_RES,  # (B, T, H, D) output of the forward and its fp16 rounding residual (with RESIDUAL)
    LSE,  # (B, H, T) fp32 from the forward
    DELTA,  # (B, H, T) fp32 out: rowsum(o * do), the softmax backward's per-row term, for _attention_bwd_dkdv
    QW, QB, KW, KB, VW, VB,  # (D,) LayerNorm weight and bias of q, k, v (unused when the norm is off)
    DQ,  # (B, T, H, D) gradient of the raw q
    DNORM_Q,  # (2, programs, D) fp32 partial sums of q's dweight, dbias
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    stride_gb, stride_gt, stride_gh,  # strides of DQ (contiguous)
    T, H,
    scale, softcap, eps,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # query rows per program, keys per tile
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
    Q_NORM: tl.constexpr, K_NORM: tl.constexpr, V_NORM: tl.constexpr,
    RESIDUAL: tl.constexpr,  # 1 when O is bf16/fp16 (see _attention_fwd)
    HEAD_ROWS: tl.constexpr,  # 1: accumulate dq^T (see _attention_bwd_dq_tiles_head_rows)
    DOT_UPCAST: tl.constexpr,  # 1 under the interpreter for bf16 (see _dot)
):
    n_blocks = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // n_blocks
    start_m = (pid % n_blocks) * BLOCK_M
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    scale = tl.cast(scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    eps = tl.cast(eps, tl.float32)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _lanes(offs_d, D, BLOCK_D)
    row_in_seq = offs_m < T
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_in_seq[:, None] & d_ok[None, :], other=0.0)
    q = _cast(_normed(q.to(tl.float32), QW, QB, offs_d, d_ok, row_in_seq, eps, D, Q_NORM), Q.dtype.element_ty, DOT_UPCAST)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_in_seq[:, None] & d_ok[None, :], other=0.0)
    # delta from o as computed, not rounded: for a near one-hot row, dp - delta must cancel as
    # exactly as PyTorch's softmax backward does; o rounded to bf16 leaves a residue the norm
    # weights amplify. o + its fp16 residual holds ~19 of fp32's 24 bits, at half fp32's bytes.
    o_offs = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    o = tl.load(O + o_offs, mask=row_in_seq[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if RESIDUAL:
        o += tl.load(O_RES + o_offs, mask=row_in_seq[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    delta = tl.sum(o * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=row_in_seq)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=row_in_seq, other=float("inf"))  # p = 0 past the end

    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, T)
        full_end = (tl.minimum(start_m + 1, T) // BLOCK_N) * BLOCK_N
    else:
        hi = T
        full_end = (T // BLOCK_N) * BLOCK_N
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    if HEAD_ROWS:
        dqt = tl.zeros([BLOCK_D, BLOCK_M], tl.float32)
        dqt = _attention_bwd_dq_tiles_head_rows(dqt, q, do, lse, delta, K, V, KW, KB, VW, VB, stride_kt, stride_vt,
                                                offs_m, offs_d, d_ok, 0, full_end, T, scale, softcap, eps,
                                                D, BLOCK_N, CAUSAL, SOFTCAP, K_NORM, V_NORM, 0, DOT_UPCAST)
        dqt = _attention_bwd_dq_tiles_head_rows(dqt, q, do, lse, delta, K, V, KW, KB, VW, VB, stride_kt, stride_vt,
                                                offs_m, offs_d, d_ok, full_end, hi, T, scale, softcap, eps,
                                                D, BLOCK_N, CAUSAL, SOFTCAP, K_NORM, V_NORM, 1, DOT_UPCAST)
        dq = tl.trans(dqt)
    else:
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        dq = _attention_bwd_dq_tiles(dq, q, do, lse, delta, K, V, KW, KB, VW, VB, stride_kt, stride_vt,
                                offs_m, offs_d, d_ok, 0, full_end, T, scale, softcap, eps,
                                D, BLOCK_N, CAUSAL, SOFTCAP, K_NORM, V_NORM, 0, DOT_UPCAST)
        dq = _attention_bwd_dq_tiles(dq, q, do, lse, delta, K, V, KW, KB, VW, VB, stride_kt, stride_vt,
                                offs_m, offs_d, d_ok, full_end, hi, T, scale, softcap, eps,
                                D, BLOCK_N, CAUSAL, SOFTCAP, K_NORM, V_NORM, 1, DOT_UPCAST)
    dq = tl.where(row_in_seq[:, None], dq * scale, 0.0)
    if Q_NORM:
        q_raw = tl.load(q_ptrs, mask=row_in_seq[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        dq = _norm_backward(dq, q_raw, QW, DNORM_Q, pid, tl.num_programs(0), offs_d, d_ok, row_in_seq, eps, D)
    tl.store(DQ + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gt + offs_d[None, :],
             _cast(dq, DQ.dtype.element_ty, DOT_UPCAST), mask=row_in_seq[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers


def block_sizes(D: int, dtype: torch.dtype, arch: int | None) -> dict:
    """Fixed tile shapes, warps and stages per kernel for head width D on a GPU of compute
    capability `arch` (80 for sm_80, 90 for sm_90a), or for the interpreter when `arch` is None.
    Chosen by the tile width BLOCK_D (D rounded up to a power of two; the lanes past D are masked),
    so D = 40 runs the D = 64 tiles. No autotuning: deterministic, and what the AOT test compiles
    (tests/test_kernels_fused_attention.py: registers, spills, tensor cores on sm_80 and sm_90a).

    Under the interpreter every tile is 16 rows: the tests' short sequences then cross several tile
    boundaries, and the numpy programs stay small.
    """
    block_d = triton.next_power_of_2(D)
    if arch is None:
        cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
        bwd = dict(cfg, HEAD_ROWS=int(block_d == 256 and D % 16 == 0))  # as sm_90a takes them
        return {"fwd": cfg, "dkdv": bwd, "dq": bwd}
    if dtype == torch.float32:
        # 3xTF32 matmuls (see _dot) hold each fp32 operand twice, as its TF32 high and low parts:
        # small tiles, and at BLOCK_D = 128 8 warps for the backward, keep them in registers.
        # (fp32 above D = 128 is left to the reference: checks.attention_limits.)
        # Masked lanes (D below its tile width) cost registers too: 8 warps there as well.
        wide = block_d == 128 or D != block_d
        fwd = dict(BLOCK_M=16 if block_d == 128 else 32, BLOCK_N=16, num_warps=4, num_stages=1)
        dkdv = dict(BLOCK_M=16, BLOCK_N=16, num_warps=8 if wide else 4, num_stages=1)
        # dq's key loop 4-deep pipelined: its K and V tiles wait in shared memory (~100 KB), not
        # in registers, which keeps dq spill-free at every width a multiple of 16 on sm_80 and
        # sm_90a (1 stage spilled 16 bytes at BLOCK_D = 128 with every option on sm_90a). The odd
        # multiples of 8 from 72 to 120 (narrower loads) spill 16-20 bytes at every 4 or 8 warps,
        # 1 to 4 stages.
        dq = dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=4)
    elif block_d == 256 and arch >= 90 and D % 16 == 0:
        fwd = dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=1)
        # A wgmma takes 64 rows a warp group. Keys (dkdv) or queries (dq) as the rows need 64x256
        # fp32 accumulators, which spilled at every tile shape; with HEAD_ROWS, D gives the rows and
        # the accumulators are (256, 16). The norms then run outside the backward (see
        # fused_attention_bwd): inside, the normalised tiles still spilled 150-800 bytes. dkdv's
        # 3-stage query loop (207 KB of shared memory) keeps D = 160 and 192 spill-free too. The
        # odd multiples of 8 (no 16-byte-aligned rows, so no asynchronous copies) spill 0.3-1 KB
        # this way: they keep the mma.sync tiles below (dq spills 40 bytes there, as before).
        dkdv = dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=3, HEAD_ROWS=1)
        dq = dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2, HEAD_ROWS=1)
    elif block_d == 256:
        # sm_80's mma.sync holds the Q tile and the accumulator in registers: half the rows there.
        fwd = dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1)
        dkdv = dict(BLOCK_M=32, BLOCK_N=16, num_warps=8, num_stages=1)
        dq = dict(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=1)
    elif block_d == 128:
        # On sm_90a a wgmma needs 64 rows a warp group: dkdv's rows are its keys (BLOCK_N), dq's
        # its queries (BLOCK_M).
        hopper = arch >= 90
        fwd = dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=1)
        dkdv = dict(BLOCK_M=16, BLOCK_N=64 if hopper else 32, num_warps=8 if hopper else 4, num_stages=1)
        dq = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1) if hopper else \
            dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)
    else:
        # sm_80 at 64 keys per tile spills a few bytes with every option on (max logit included).
        fwd = dict(BLOCK_M=128, BLOCK_N=64 if arch >= 90 else 32, num_warps=8, num_stages=2)
        # A width that is an odd multiple of 8 has strides the loads cannot assume 16-divisible:
        # narrower vectors, more registers, so twice the warps (and on sm_90a half the queries)
        # for the backward's tiles.
        warps = 8 if D % 16 else 4
        if block_d == 64 and arch >= 90:  # 64 keys a tile: wgmma (see above)
            dkdv = dict(BLOCK_M=16 if D % 16 else 32, BLOCK_N=64, num_warps=8, num_stages=1)
        else:
            dkdv = dict(BLOCK_M=32, BLOCK_N=64 if block_d <= 32 else 32, num_warps=warps, num_stages=1)
        dq = dict(BLOCK_M=64, BLOCK_N=32, num_warps=warps, num_stages=1)
    return {"fwd": fwd, "dkdv": {"HEAD_ROWS": 0, **dkdv}, "dq": {"HEAD_ROWS": 0, **dq}}


def _blocks(q: torch.Tensor) -> dict:
    if not q.is_cuda:
        return block_sizes(q.shape[-1], q.dtype, None)
    major, minor = torch.cuda.get_device_capability(q.device)
    return block_sizes(q.shape[-1], q.dtype, 10 * major + minor)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Any strides over B, T and H are read in place; only a strided head dimension is copied."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _bhts(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _norm_args(weight, bias, like: torch.Tensor):
    """(weight, bias) for the kernel: a missing bias reads as zeros, a missing norm as a dummy."""
    if weight is None:
        return like, like
    return weight, bias if bias is not None else torch.zeros_like(weight)


def _flags(q, causal, softcap, q_weight, k_weight, v_weight) -> dict:
    """The constexprs every attention kernel takes, derived from its inputs."""
    return dict(BLOCK_D=triton.next_power_of_2(q.shape[-1]), CAUSAL=int(causal), SOFTCAP=int(softcap is not None),
                Q_NORM=int(q_weight is not None), K_NORM=int(k_weight is not None), V_NORM=int(v_weight is not None),
                DOT_UPCAST=int(q.dtype == torch.bfloat16 and not q.is_cuda))


def _residual_shape(q: torch.Tensor) -> tuple:
    """The fp16 rounding residual of o: none for fp32 o, which is exact as it is."""
    return tuple(q.shape) if q.dtype != torch.float32 else (0,)


def _head_max(part: torch.Tensor, H: int, max_logit: bool) -> torch.Tensor:
    """(H,) max over batch and query blocks of the per-program maxima; empty when not requested."""
    if not max_logit:
        return part
    return part.amax(dim=(0, 2)) if part.numel() else part.new_full((H,), float("-inf"))


# ----------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile) and autograd


@torch.library.custom_op("stableblocks::fused_attention_fwd", mutates_args=())
def fused_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    q_weight: torch.Tensor | None, q_bias: torch.Tensor | None,
    k_weight: torch.Tensor | None, k_bias: torch.Tensor | None,
    v_weight: torch.Tensor | None, v_bias: torch.Tensor | None,
    causal: bool, softcap: float | None, scale: float, eps: float, max_logit: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, o_res, lse, max_logit): o (B, T, H, D) in q's dtype, o_res what o's rounding lost, in fp16
    (empty when o is fp32), lse (B, H, T) fp32 in log2 units, max_logit (H,) fp32 when requested,
    else empty."""
    check_runnable(q)
    B, T, H, D = q.shape
    q, k, v = (_rows_contiguous(t) for t in (q, k, v))
    o = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    o_res = torch.empty(_residual_shape(q), dtype=torch.float16, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    cfg = dict(_blocks(q)["fwd"])
    n_blocks = triton.cdiv(T, cfg["BLOCK_M"])
    # One max per program, reduced over the batch and the query blocks here: no atomics, O(T) memory.
    part = torch.full((B, H, n_blocks) if max_logit else (0,), float("-inf"), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, o_res, lse, _head_max(part, H, max_logit)
    _attention_fwd[(B * H * n_blocks,)](
        q, k, v,
        *_norm_args(q_weight, q_bias, q), *_norm_args(k_weight, k_bias, q), *_norm_args(v_weight, v_bias, q),
        o, o_res if o_res.numel() else o, lse, part if max_logit else lse, *_bhts(q), *_bhts(k), *_bhts(v), *_bhts(o), T, H,
        float(scale), float(softcap or 1.0), float(eps),
        D=D, **_flags(q, causal, softcap, q_weight, k_weight, v_weight),
        MAX_LOGIT=int(max_logit), RESIDUAL=int(o_res.numel() > 0), **cfg,
    )
    launched("fused_attention_fwd")
    return o, o_res, lse, _head_max(part, H, max_logit)


@fused_attention_fwd.register_fake
def _(q, k, v, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, causal, softcap, scale, eps, max_logit):
    B, T, H, D = q.shape
    return (q.new_empty((B, T, H, D)), q.new_empty(_residual_shape(q), dtype=torch.float16),
            q.new_empty((B, H, T), dtype=torch.float32), q.new_empty((H,) if max_logit else (0,), dtype=torch.float32))


@torch.library.custom_op("stableblocks::fused_attention_bwd", mutates_args=())
def fused_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, o_res: torch.Tensor,
    lse: torch.Tensor,
    q_weight: torch.Tensor | None, q_bias: torch.Tensor | None,
    k_weight: torch.Tensor | None, k_bias: torch.Tensor | None,
    v_weight: torch.Tensor | None, v_bias: torch.Tensor | None,
    causal: bool, softcap: float | None, scale: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dnorm): dnorm (6, D) fp32 holds dweight, dbias of q's, k's and v's norms."""
    check_runnable(q)
    q, k, v, do = (_rows_contiguous(t) for t in (q, k, v, do))
    norm_params = ((q_weight, q_bias), (k_weight, k_bias), (v_weight, v_bias))
    if q.numel() and _blocks(q)["dq"]["HEAD_ROWS"] and any(w is not None for w, _ in norm_params):
        return _bwd_norms_outside(do, (q, k, v), o, o_res, lse, norm_params, causal, softcap, scale, eps)
    return _bwd(do, q, k, v, o, o_res, lse, *(t for pair in norm_params for t in pair), causal, softcap, scale, eps,
                q.dtype)


def _bwd(do, q, k, v, o, o_res, lse, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, causal, softcap, scale, eps,
         grad_dtype):
    """fused_attention_bwd's kernels, writing dq, dk, dv in grad_dtype."""
    B, T, H, D = q.shape
    dq, dk, dv = (torch.empty((B, T, H, D), dtype=grad_dtype, device=q.device) for _ in range(3))
    dnorm = torch.zeros((6, D), dtype=torch.float32, device=q.device)  # dw, db of q, k, v
    if dq.numel() == 0:
        return dq, dk, dv, dnorm
    blocks = _blocks(q)
    flags = _flags(q, causal, softcap, q_weight, k_weight, v_weight)
    norms = (*_norm_args(q_weight, q_bias, q), *_norm_args(k_weight, k_bias, q), *_norm_args(v_weight, v_bias, q))
    scalars = (T, H, float(scale), float(softcap or 1.0), float(eps))

    # dq first: it also writes delta = rowsum(o * do), which dkdv reads.
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    cfg = dict(blocks["dq"])
    n_prog = B * H * triton.cdiv(T, cfg["BLOCK_M"])
    # Every program writes its row of a partial-sum buffer, so torch.empty is safe.
    part_q = torch.empty((2, n_prog, D), dtype=torch.float32, device=q.device) if q_weight is not None else lse
    _attention_bwd_dq[(n_prog,)](
        q, k, v, do, o, o_res if o_res.numel() else o, lse, delta, *norms, dq, part_q,
        *_bhts(q), *_bhts(k), *_bhts(v), *_bhts(o), *_bhts(do), *_bhts(dq), *scalars, D=D, **flags,
        RESIDUAL=int(o_res.numel() > 0), **cfg)
    launched("fused_attention_bwd_dq")

    cfg = dict(blocks["dkdv"])
    n_prog = B * H * triton.cdiv(T, cfg["BLOCK_N"])
    part_k = torch.empty((2, n_prog, D), dtype=torch.float32, device=q.device) if k_weight is not None else lse
    part_v = torch.empty((2, n_prog, D), dtype=torch.float32, device=q.device) if v_weight is not None else lse
    _attention_bwd_dkdv[(n_prog,)](
        q, k, v, do, lse, delta, *norms, dk, dv, part_k, part_v,
        *_bhts(q), *_bhts(k), *_bhts(v), *_bhts(do), *_bhts(dk), *scalars, D=D, **flags, **cfg)
    launched("fused_attention_bwd_dkdv")

    # Partial sums reduced in a fixed order: deterministic weight/bias gradients.
    for i, (weight, part) in enumerate(((q_weight, part_q), (k_weight, part_k), (v_weight, part_v))):
        if weight is not None:
            dnorm[2 * i: 2 * i + 2] = part.sum(dim=1)
    return dq, dk, dv, dnorm


def _bwd_norms_outside(do, qkv, o, o_res, lse, norm_params, causal, softcap, scale, eps):
    """fused_attention_bwd for HEAD_ROWS tiles: the LayerNorm kernels normalise q, k, v (fp32
    statistics, as the attention kernels do) around a norm-free attention backward, then take its
    gradients, kept in fp32 as the fused norms keep them (bf16 there costs ~3x the error), back to
    the raw q, k, v. Costs passes over q, k, v, their normalised copies and the fp32 gradients."""
    normed = [t if w is None else layer_norm_fwd(t, w, b, eps) for t, (w, b) in zip(qkv, norm_params)]
    grads = _bwd(do, *(n if isinstance(n, torch.Tensor) else n[0] for n in normed), o, o_res, lse,
                 None, None, None, None, None, None, causal, softcap, scale, eps, torch.float32)[:3]
    dnorm = torch.zeros((6, qkv[0].shape[-1]), dtype=torch.float32, device=do.device)
    out = []
    for i, (g, t, n, (w, b)) in enumerate(zip(grads, qkv, normed, norm_params)):
        if w is None:
            out.append(g.to(t.dtype))
            continue
        dx, dw, db = layer_norm_bwd(g, t, w, b, n[1], n[2])
        out.append(dx)
        dnorm[2 * i] = dw
        if b is not None:
            dnorm[2 * i + 1] = db
    return *out, dnorm


@fused_attention_bwd.register_fake
def _(do, q, k, v, o, o_res, lse, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, causal, softcap, scale, eps):
    B, T, H, D = q.shape
    shape = (B, T, H, D)
    return q.new_empty(shape), q.new_empty(shape), q.new_empty(shape), q.new_empty((6, D), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, *params, causal, softcap, scale, eps, _ = inputs
    o, o_res, lse, max_logit = output
    ctx.save_for_backward(q, k, v, o, o_res, lse, *params)
    ctx.options = (causal, softcap, scale, eps)
    ctx.mark_non_differentiable(o_res, lse, max_logit)


def _backward(ctx, do, _do_res, _dlse, _dmax_logit):
    q, k, v, o, o_res, lse, *params = ctx.saved_tensors
    dq, dk, dv, dnorm = fused_attention_bwd(do, q, k, v, o, o_res, lse, *params, *ctx.options)
    dparams = [None if p is None else dnorm[i].to(p.dtype) for i, p in enumerate(params)]
    return dq, dk, dv, *dparams, None, None, None, None, None


fused_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_attention(q, k, v, *, causal=True, softcap=None, q_norm=None, k_norm=None, v_norm=None, scale=None, eps=1e-5,
                    return_max_logit=False):
    """The Triton path of kernels.fused_attention.fused_attention (arguments already validated)."""
    (qw, qb), (kw, kb), (vw, vb) = (p if p is not None else (None, None) for p in (q_norm, k_norm, v_norm))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    softcap = None if softcap is None else float(softcap)
    o, _, _, max_logit = fused_attention_fwd(q, k, v, qw, qb, kw, kb, vw, vb, bool(causal), softcap, scale, float(eps),
                                             bool(return_max_logit))
    return (o, max_logit) if return_max_logit else o


# ----------------------------------------------------------------------------------------------
# What the AOT compile test and the benchmarks' compile report build


# Option sets worth compiling: every option on (QKV-norm, soft-cap, the max logit) and none.
AOT_OPTIONS = {
    "all": dict(CAUSAL=1, SOFTCAP=1, Q_NORM=1, K_NORM=1, V_NORM=1, MAX_LOGIT=1),
    "none": dict(CAUSAL=1, SOFTCAP=0, Q_NORM=0, K_NORM=0, V_NORM=0, MAX_LOGIT=0),
}


def _signatures(ty: str) -> dict:
    """Runtime argument types of each kernel for activations of Triton type `ty` and fp32 norms."""
    io = {name: f"*{ty}" for name in ("Q", "K", "V")}
    norms = {name: "*fp32" for name in ("QW", "QB", "KW", "KB", "VW", "VB")}
    scalars = {"T": "i32", "H": "i32", "scale": "fp32", "softcap": "fp32", "eps": "fp32"}

    def strides(*names):
        return {f"stride_{n}{x}": "i32" for n in names for x in "bth"}

    return {
        "_attention_fwd": {**io, **norms, "O": f"*{ty}", "O_RES": "*fp16", "LSE": "*fp32", "MAXLOGIT": "*fp32",
                      **strides("q", "k", "v", "o"), **scalars},
        "_attention_bwd_dkdv": {**io, "DO": f"*{ty}", "LSE": "*fp32", "DELTA": "*fp32", **norms, "DK": f"*{ty}",
                           "DV": f"*{ty}", "DNORM_K": "*fp32", "DNORM_V": "*fp32",
                           **strides("q", "k", "v", "do", "g"), **scalars},
        "_attention_bwd_dq": {**io, "DO": f"*{ty}", "O": f"*{ty}", "O_RES": "*fp16", "LSE": "*fp32", "DELTA": "*fp32", **norms,
                         "DQ": f"*{ty}", "DNORM_Q": "*fp32", **strides("q", "k", "v", "o", "do", "g"), **scalars},
    }


# The widths the AOT test compiles: every tile width (16 to 256), widths that are not a power of
# two (masked lanes), and each of them that is an odd multiple of 8 (strides not 16-divisible).
AOT_HEAD_DIMS = (16, 40, 48, 64, 80, 96, 128, 160, 192, 256)


def aot_configs(dtypes=(torch.bfloat16, torch.float16), options=("all", "none"), archs=(80, 90),
                head_dims=AOT_HEAD_DIMS) -> list:
    """aot.CompileJobs for every kernel, head width (the float32 ones the kernel takes), dtype,
    option set and arch, at the tile shapes, warps and stages the launcher picks on that GPU.
    Pointers are marked 16-byte aligned, and strides 16-divisible where D is a multiple of 16, as
    the JIT specialises them for (B, T, H, D) views of a projection's output.
    """
    from .aot import CompileJob
    from .checks import ATTENTION_FP32_MAX_HEAD_DIM

    tl_types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    jobs = []
    for dtype in dtypes:
        for kernel, sig in _signatures(tl_types[dtype]).items():
            for D in head_dims:
                if dtype == torch.float32 and D > ATTENTION_FP32_MAX_HEAD_DIM:
                    continue
                aligned = [name for name, ty in sig.items()
                           if ty.startswith("*") or (name.startswith("stride_") and D % 16 == 0)]
                for arch in archs:
                    cfg = dict(block_sizes(D, dtype, arch)[kernel.removeprefix("_attention_").removeprefix("bwd_")])
                    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                    for name in options:
                        flags = {k: v for k, v in AOT_OPTIONS[name].items() if k != "MAX_LOGIT" or kernel == "_attention_fwd"}
                        if cfg.get("HEAD_ROWS"):  # launched only norm-free (_bwd_norms_outside)
                            flags.update(Q_NORM=0, K_NORM=0, V_NORM=0)
                        if kernel != "_attention_bwd_dkdv":
                            flags["RESIDUAL"] = int(dtype != torch.float32)
                        constexprs = {"D": D, "BLOCK_D": triton.next_power_of_2(D), **cfg, **flags, "DOT_UPCAST": 0}
                        jobs.append(CompileJob(__name__, kernel, sig, constexprs, arch, warps, stages, aligned))
    return jobs


backend.KERNELS.add("fused_attention")
