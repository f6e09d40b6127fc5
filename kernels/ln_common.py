"""What the LayerNorm-family kernels share: the normalisation math in Triton, tile shapes and
program counts chosen from the width alone, and the row views the launchers hand to kernels.

Every kernel of the family works on a tile of BLOCK_M rows x BLOCK_N columns, BLOCK_N the
width rounded up to a power of two: a row is read once, its statistics stay in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import backend

# Elements per tile: 16 fp32 values per thread at the warp counts below.
_TILE_ELEMENTS = 4096
_MAX_ROWS_PER_TILE = 16


@triton.jit
def normalize(x, col_ok, width, eps):
    """Row statistics of an fp32 tile x (masked lanes hold 0) -> mean, rstd, xhat (masked lanes 0)."""
    mean = tl.sum(x, axis=1) / width
    # Padded lanes would add mean^2 each to the variance: keep them out.
    centred = tl.where(col_ok[None, :], x - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / width
    rstd = 1.0 / tl.sqrt(var + eps)
    return mean, rstd, centred * rstd[:, None]


@triton.jit
def layer_norm_rows(x, W, B, Mean, Rstd, row, row_ok, col, col_ok, width, eps, HAS_BIAS: tl.constexpr):
    """LayerNorm of an fp32 tile with its (width,) weight and optional bias; stores the rows'
    mean and rstd (fp32, for the backward) -> the normalised tile, fp32."""
    mean, rstd, y = normalize(x, col_ok, width, eps)
    y *= tl.load(W + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(B + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Mean + row, mean, mask=row_ok)
    tl.store(Rstd + row, rstd, mask=row_ok)
    return y


@triton.jit
def normalize_backward(dxhat, xhat, rstd, col_ok, width):
    """Gradient through xhat = (x - mean) * rstd: dxhat = dy * weight, all fp32 tiles."""
    c1 = tl.sum(xhat * dxhat, axis=1) / width
    c2 = tl.sum(dxhat, axis=1) / width
    dx = (dxhat - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    return tl.where(col_ok[None, :], dx, 0.0)


@triton.jit
def cast_rtne(y, dtype: tl.constexpr):
    """fp32 tile -> dtype, rounding to nearest even. For bfloat16 the rounding is done here in
    integer ops: the GPU's conversion rounds to nearest even, Triton's interpreter truncates,
    and the CPU tests must see what a GPU computes."""
    if dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        y = tl.where(y == y, bits.to(tl.float32, bitcast=True), y)  # NaN stays NaN
    return y.to(dtype)


def tile(width: int, backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of `width`; the same on every device.

    Forward tiles give each thread 16 values. Backward kernels keep about twice as many tiles
    live, so theirs hold half the rows (where there are two or more) and give each thread 8:
    without that the add-norm backward at d=4096 needs 238 registers a thread."""
    block_n = triton.next_power_of_2(width)
    block_m = max(1, min(_MAX_ROWS_PER_TILE, _TILE_ELEMENTS // block_n))
    if backward:
        block_m = max(1, block_m // 2)
    num_warps = max(1, min(16, block_m * block_n // (256 if backward else 512)))
    return block_m, block_n, num_warps


def aot_config(module: str, kernel: str, width: int, signature: dict, constexprs: dict, backward: bool = False,
               act: str = "fp32"):
    """One aot.CompileJob as the launcher would run `module.kernel` at `width` (the same tiles on
    every architecture: compile_report compiles it for each); "*act" in the signature stands for a
    pointer to activations of type `act` (fp32, bf16, fp16)."""
    from .aot import CompileJob

    block_m, block_n, num_warps = tile(width, backward)
    return CompileJob(module, kernel, {k: "*" + act if v == "*act" else v for k, v in signature.items()},
                      {**constexprs, "BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps)


def partial_programs(n_rows: int, block_m: int, device: torch.device) -> int:
    """Programs of a persistent backward grid, each keeping one fp32 partial row of weight
    gradients. On a GPU: one to four per SM, and at least 128 rows per program past one per SM,
    so the partial rows (written, then read by the final sum) stay a few percent of the traffic.

    Fixed for a device and shape, so the order of the final sum, and the gradients, repeat bitwise."""
    tiles = triton.cdiv(n_rows, block_m)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(tiles, max(sms, min(4 * sms, n_rows // 128))))
    return max(1, min(tiles, 4))  # the interpreter runs programs one after another


def rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, width) with unit column stride: a view when the layout allows, else one copy."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.numel() == 0 else t2.contiguous()


def launched(name: str) -> None:
    backend.LAUNCHES[name] += 1


def check_runnable(t: torch.Tensor) -> None:
    """Triton on CPU tensors exists only in the interpreter: say so rather than crash in Triton."""
    if t.device.type == "cpu" and not backend.interpreting():
        raise RuntimeError("stableblocks Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")


def empty(device: torch.device) -> torch.Tensor:
    """Stands in for an absent output of a custom op (its schema returns tensors only); the
    fake implementations return the same, so compiled graphs see the same metadata."""
    return torch.empty(0, dtype=torch.float32, device=device)


def sum_partials(part: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """Fixed-order fp32 sum of per-program partial rows, in the dtype of the weight it belongs to
    (an empty tensor when there is no such weight)."""
    return empty(part.device) if like is None else part.sum(0).to(like.dtype)
