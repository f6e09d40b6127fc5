"""LM head + cross-entropy in Triton: logit tiles live in registers, never in memory as a whole.

Forward: one program per BLOCK_N tokens walks the vocabulary in BLOCK_V tiles; each tile of
logits u = h W^T (+ b) is a tensor-core matmul over d, soft-capped, and folded into an online
max / sum (fp32) with the target's logit picked on the way. It writes three fp32 values per
token: the loss term, the log-sum-exp (saved for backward) and max |u| (diagnostics).

Backward, a chunk of rows at a time: one kernel recomputes the chunk's logit tiles and writes
d u for the chunk (chunk x V, hidden's dtype), then one matmul kernel forms d hidden = d u W and
another adds d u^T h into an fp32 d weight, chunk after chunk: a fixed order, so d weight
repeats bitwise. Extra memory: 3 fp32 values per token, the d u chunk (at most CHUNK_ELEMENTS
values) and, when the weight is not fp32, the fp32 d weight accumulator (V x d). At V = 50257,
d = 768, N = 8192 in bf16: 96 KB + 129 MB + 154 MB, against 823 MB for the bf16 logits alone.

Layering: kernels -> launchers -> torch.library ops with autograd -> fused_linear_cross_entropy(),
which kernels/fused_linear_cross_entropy.py calls after validating its arguments.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import backend
from .fused_attention_triton import _dot, _tanh
from .ln_common import cast_rtne, check_runnable, launched

# d u values per backward chunk: 128 MB in bf16. Rows per chunk are a multiple of the row tile.
CHUNK_ELEMENTS = 1 << 26


@triton.jit
def _logit_tile(H, W, Bias, row, row_ok, col, col_ok, stride_h, width, softcap,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """(u, z) for BLOCK_N rows x BLOCK_V vocabulary entries, fp32; z = softcap * tanh(u / softcap)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    k = tl.arange(0, BLOCK_D)
    h_ptr = H + row[:, None] * stride_h + k[None, :]
    w_ptr = W + col.to(tl.int64)[:, None] * width + k[None, :]
    for d0 in range(0, width, BLOCK_D):
        k_ok = k < width - d0
        h = tl.load(h_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(h, tl.trans(w.to(h.dtype)), acc, DOT_UPCAST)
        h_ptr += BLOCK_D
        w_ptr += BLOCK_D
    if HAS_BIAS:
        acc += tl.load(Bias + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        return acc, softcap * _tanh(acc / softcap)
    else:
        return acc, acc


@triton.jit
def _linear_cross_entropy_fwd(
    H,  # *(n_rows, width) hidden states, unit column stride
    W,  # *(vocab, width) weight, contiguous, any float dtype (cast to H's)
    Bias,  # *(vocab,) ignored unless HAS_BIAS
    T,  # *int (n_rows,) targets
    LOSS,  # *fp32 (n_rows,) lse - z_t + z_loss * lse^2, 0 where ignored
    LSE,  # *fp32 (n_rows,) log-sum-exp of z, saved for backward
    UMAX,  # *fp32 (n_rows,) max |u| over the row, 0 where ignored
    stride_h,
    n_rows,
    vocab,
    width,
    ignore_index,
    softcap,  # float; cast to fp32 here
    z_loss,  # float; cast to fp32 here
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_UPCAST: tl.constexpr,  # 1 under the interpreter for bf16 (see fused_attention_triton._dot)
):
    row = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = row < n_rows
    row = row.to(tl.int64)
    t = tl.load(T + row, mask=row_ok, other=ignore_index).to(tl.int64)
    kept = row_ok & (t != ignore_index)
    softcap = tl.cast(softcap, tl.float32)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    umax = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        col = v0 + tl.arange(0, BLOCK_V)
        col_ok = col < vocab
        u, z = _logit_tile(H, W, Bias, row, row_ok, col, col_ok, stride_h, width, softcap,
                           HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_UPCAST)
        umax = tl.maximum(umax, tl.max(tl.where(col_ok[None, :], tl.abs(u), 0.0), axis=1))
        z = tl.where(col_ok[None, :], z, float("-inf"))  # every tile holds a real column: m stays finite
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        zt += tl.sum(tl.where(col[None, :] == t[:, None], z, 0.0), axis=1)
    lse = m + tl.log(s)
    loss = lse - zt + tl.cast(z_loss, tl.float32) * lse * lse
    tl.store(LOSS + row, tl.where(kept, loss, 0.0), mask=row_ok)
    tl.store(LSE + row, lse, mask=row_ok)
    tl.store(UMAX + row, tl.where(kept, umax, 0.0), mask=row_ok)


@triton.jit
def _linear_cross_entropy_bwd_logits(
    H,  # *(n_rows, width) hidden states of this chunk, unit column stride
    W,  # *(vocab, width) weight, contiguous
    Bias,  # *(vocab,) ignored unless HAS_BIAS
    T,  # *int (n_rows,) targets of this chunk
    LSE,  # *fp32 (n_rows,)
    G,  # *fp32 (n_rows,) gradient of each token's loss term
    DU,  # *(n_rows, vocab) output: d u, H's dtype, row stride stride_du
    stride_h,
    stride_du,  # vocab rounded up to a multiple of 16 elements: aligned rows for the d weight matmul
    n_rows,
    vocab,
    width,
    ignore_index,
    softcap,
    z_loss,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = row < n_rows
    col_ok = col < vocab
    row = row.to(tl.int64)
    t = tl.load(T + row, mask=row_ok, other=ignore_index).to(tl.int64)
    kept = row_ok & (t != ignore_index)
    softcap = tl.cast(softcap, tl.float32)
    lse = tl.load(LSE + row, mask=row_ok, other=0.0)
    g = tl.where(kept, tl.load(G + row, mask=row_ok, other=0.0), 0.0)
    _, z = _logit_tile(H, W, Bias, row, row_ok, col, col_ok, stride_h, width, softcap,
                       HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_UPCAST)
    p = tl.exp(z - lse[:, None])
    dz = p * (g * (1.0 + 2.0 * tl.cast(z_loss, tl.float32) * lse))[:, None]
    dz -= tl.where(col[None, :] == t[:, None], g[:, None], 0.0)
    if SOFTCAP:
        c = z / softcap
        dz = dz * (1.0 - c * c)
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(DU + row[:, None] * stride_du + col[None, :], cast_rtne(dz, DU.dtype.element_ty), mask=ok)


@triton.jit
def _linear_cross_entropy_matmul(
    A,  # *(M, K) by its strides
    B,  # *(K, N) by its strides; cast to A's dtype
    C,  # *(M, N) output, contiguous; fp32 when ACCUMULATE
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    ACCUMULATE: tl.constexpr,  # C += A B (else C = A B)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """One output tile per program, K walked in order: each element's sum has a fixed order."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    ok = m_ok[:, None] & n_ok[None, :]
    c_ptr = C + rm64[:, None] * N + rn64[None, :]
    if ACCUMULATE:  # start from C: no second tile live at the end
        acc = tl.load(c_ptr, mask=ok, other=0.0)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    rk = tl.arange(0, BLOCK_K)
    a_ptr = A + rm64[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptr = B + rk[:, None] * stride_bk + rn64[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        a = tl.load(a_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b.to(a.dtype), acc, DOT_UPCAST)
        a_ptr += BLOCK_K * stride_ak
        b_ptr += BLOCK_K * stride_bk
    tl.store(c_ptr, cast_rtne(acc, C.dtype.element_ty), mask=ok)


# ---- launchers ----

def tiles(dtype: torch.dtype, interpreting: bool = False) -> dict:
    """Block sizes and warps per kernel. Under the interpreter, the smallest tiles tl.dot takes, so
    tests at tiny sizes cross several row, vocabulary and width tiles."""
    if interpreting:
        t = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, num_warps=4)
        return dict(fwd=t, bwd_logits=t, matmul=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, num_warps=4))
    # Chosen by tests/test_kernels_fused_linear_cross_entropy.py's AOT check: no spills on sm_80, sm_90a.
    if dtype == torch.float32:  # 3xTF32 keeps high and low parts live: smaller tiles
        t = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=16, num_warps=8)
        return dict(fwd=t, bwd_logits=t, matmul=dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=4))
    t = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, num_warps=8)
    return dict(fwd=t, bwd_logits=t, matmul=dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8))


def _upcast(x: torch.Tensor) -> int:
    return int(x.dtype == torch.bfloat16 and not x.is_cuda)


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool, cfg: dict) -> None:
    """out (+)= a @ b for 2-D views (any strides) into a contiguous out."""
    (M, K), N = a.shape, b.shape[1]
    cfg = dict(cfg)
    warps = cfg.pop("num_warps")
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _linear_cross_entropy_matmul[grid](a, b, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                       ACCUMULATE=int(accumulate), DOT_UPCAST=_upcast(a), num_warps=warps, **cfg)


def chunk_rows(n_rows: int, vocab: int, block_n: int) -> int:
    """Rows per backward chunk: a multiple of the row tile, d u of at most CHUNK_ELEMENTS values."""
    rows = max(block_n, CHUNK_ELEMENTS // vocab // block_n * block_n)
    return min(rows, triton.cdiv(max(n_rows, 1), block_n) * block_n)


@torch.library.custom_op("stableblocks::fused_linear_cross_entropy_fwd", mutates_args=())
def fused_linear_cross_entropy_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    ignore_index: int, softcap: Optional[float], z_loss: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, d) with unit column stride -> (loss terms, lse, max |u|), fp32 (N,) each."""
    check_runnable(hidden)
    n_rows, width = hidden.shape
    vocab = weight.shape[0]
    loss, lse, umax = (torch.empty(n_rows, dtype=torch.float32, device=hidden.device) for _ in range(3))
    if n_rows:
        weight = weight.contiguous()
        cfg = dict(tiles(hidden.dtype, backend.interpreting())["fwd"])
        warps = cfg.pop("num_warps")
        _linear_cross_entropy_fwd[(triton.cdiv(n_rows, cfg["BLOCK_N"]),)](
            hidden, weight, weight if bias is None else bias.contiguous(), targets, loss, lse, umax,
            hidden.stride(0), n_rows, vocab, width, ignore_index, 1.0 if softcap is None else softcap, z_loss,
            HAS_BIAS=int(bias is not None), SOFTCAP=int(softcap is not None), DOT_UPCAST=_upcast(hidden),
            num_warps=warps, **cfg)
        launched("fused_linear_cross_entropy_fwd")
    return loss, lse, umax


@fused_linear_cross_entropy_fwd.register_fake
def _(hidden, weight, bias, targets, ignore_index, softcap, z_loss):
    out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    return out, torch.empty_like(out), torch.empty_like(out)


@torch.library.custom_op("stableblocks::fused_linear_cross_entropy_bwd", mutates_args=())
def fused_linear_cross_entropy_bwd(
    g: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    targets: torch.Tensor, lse: torch.Tensor, ignore_index: int, softcap: Optional[float], z_loss: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (d hidden, d weight, d bias); d bias is empty without a bias."""
    check_runnable(hidden)
    n_rows, width = hidden.shape
    vocab = weight.shape[0]
    weight = weight.contiguous()
    g = g.to(torch.float32).contiguous()
    dh = torch.empty((n_rows, width), dtype=hidden.dtype, device=hidden.device)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device)
    db = torch.zeros(vocab if bias is not None else 0, dtype=torch.float32, device=hidden.device)
    cfg = tiles(hidden.dtype, backend.interpreting())
    logits = dict(cfg["bwd_logits"])
    warps = logits.pop("num_warps")
    rows = chunk_rows(n_rows, vocab, logits["BLOCK_N"])
    padded = triton.cdiv(vocab, 16) * 16
    du = torch.empty((min(rows, n_rows), padded), dtype=hidden.dtype, device=hidden.device)[:, :vocab] if n_rows else None
    for start in range(0, n_rows, rows):
        end = min(start + rows, n_rows)
        h, dz = hidden[start:end], du[:end - start]
        grid = (triton.cdiv(end - start, logits["BLOCK_N"]), triton.cdiv(vocab, logits["BLOCK_V"]))
        _linear_cross_entropy_bwd_logits[grid](
            h, weight, weight if bias is None else bias.contiguous(), targets[start:end], lse[start:end],
            g[start:end], dz, hidden.stride(0), padded, end - start, vocab, width, ignore_index,
            1.0 if softcap is None else softcap, z_loss, HAS_BIAS=int(bias is not None),
            SOFTCAP=int(softcap is not None), DOT_UPCAST=_upcast(hidden), num_warps=warps, **logits)
        _matmul(dz, weight, dh[start:end], False, cfg["matmul"])
        _matmul(dz.t(), h, dw, True, cfg["matmul"])
        if bias is not None:
            db += dz.sum(0, dtype=torch.float32)
        launched("fused_linear_cross_entropy_bwd")
    return dh, dw.to(weight.dtype), db.to(bias.dtype) if bias is not None else db


@fused_linear_cross_entropy_bwd.register_fake
def _(g, hidden, weight, bias, targets, lse, ignore_index, softcap, z_loss):
    db = hidden.new_empty(0, dtype=torch.float32) if bias is None else torch.empty_like(bias)
    return hidden.new_empty(hidden.shape), torch.empty_like(weight, memory_format=torch.contiguous_format), db


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, softcap, z_loss = inputs
    _, lse, umax = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse)
    ctx.options = ignore_index, softcap, z_loss
    ctx.mark_non_differentiable(lse, umax)


def _backward(ctx, g, _dlse, _dumax):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    dh, dw, db = fused_linear_cross_entropy_bwd(g, hidden, weight, bias, targets, lse, *ctx.options)
    return dh, dw, None if bias is None else db, None, None, None, None


fused_linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_cross_entropy(hidden, weight, targets, bias, ignore_index, softcap, z_loss):
    """The Triton path of kernels/fused_linear_cross_entropy.py (arguments already validated):
    (N, d) hidden, (N,) targets -> (loss terms, lse, max |u|), fp32 (N,) each."""
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    return fused_linear_cross_entropy_fwd(hidden, weight, bias, targets, ignore_index, softcap, z_loss)


def aot_configs(dtypes=(torch.bfloat16, torch.float32), archs=(80, 90), width=768, vocab=50257) -> list:
    """aot.CompileJobs for the kernels as the launchers run them on a GPU at GPT-2's sizes (soft-cap
    and bias on: the most registers). Like the JIT: strides of 1 become constants, and pointers and
    integers divisible by 16 (d, the padded d u rows) are marked so."""
    from .aot import CompileJob

    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    jobs = []
    for dtype in dtypes:
        ty = names[dtype]
        cfg = tiles(dtype)
        common = {"H": f"*{ty}", "W": "*fp32", "Bias": "*fp32", "T": "*i64"}
        scalars = {"stride_h": "i32", "n_rows": "i32", "vocab": "i32", "width": "i32", "ignore_index": "i32",
                   "softcap": "fp32", "z_loss": "fp32"}
        sigs = {"_linear_cross_entropy_fwd": {**common, "LOSS": "*fp32", "LSE": "*fp32", "UMAX": "*fp32", **scalars},
                "_linear_cross_entropy_bwd_logits": {**common, "LSE": "*fp32", "G": "*fp32", "DU": f"*{ty}", **scalars,
                                                     "stride_du": "i32"}}
        aligned = ["stride_h", "width", "stride_du"]
        for arch in archs:
            for kernel, sig in sigs.items():
                tile = dict(cfg[kernel.removeprefix("_linear_cross_entropy_")])
                warps = tile.pop("num_warps")
                jobs.append(CompileJob(__name__, kernel, sig, {**tile, "HAS_BIAS": 1, "SOFTCAP": 1, "DOT_UPCAST": 0},
                                       arch, warps, divisible_by_16=[*(k for k in sig if sig[k][0] == "*"),
                                                                     *(a for a in aligned if a in sig)]))
            # d hidden = d u W: A = d u (unit column stride), B = the fp32 weight (unit column stride).
            # d weight += d u^T h: A = d u^T (unit row stride), B = hidden, C = the fp32 accumulator.
            tile = dict(cfg["matmul"])
            warps = tile.pop("num_warps")
            for b_ty, c_ty, acc, unit, strides in (("*fp32", f"*{ty}", 0, "stride_ak", ("stride_am", "stride_bk")),
                                                   (f"*{ty}", "*fp32", 1, "stride_am", ("stride_ak", "stride_bk"))):
                sig = {"A": f"*{ty}", "B": b_ty, "C": c_ty, "M": "i32", "N": "i32", "K": "i32",
                       **{name: "i32" for name in strides}}
                jobs.append(CompileJob(__name__, "_linear_cross_entropy_matmul", sig, {**tile, unit: 1, "stride_bn": 1,
                                                                      "ACCUMULATE": acc, "DOT_UPCAST": 0},
                                       arch, warps, divisible_by_16=["A", "B", "C", "N", *strides]))
    return jobs


backend.KERNELS.add("fused_linear_cross_entropy")
