"""Small kernels whose compiled resource usage is predictable, for tests/test_aot.py."""
import triton
import triton.language as tl


@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x + y, mask=mask)


@triton.jit
def dot_kernel(a_ptr, b_ptr, c_ptr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a = tl.load(a_ptr + rm[:, None] * BK + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * BN + rn[None, :])
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], tl.dot(a, b))


@triton.jit
def spill_kernel(x_ptr, out_ptr, n_iter, BLOCK: tl.constexpr):
    # Two BLOCK-wide fp32 tensors stay live across a runtime-length loop; with
    # BLOCK=8192 on one warp that is 512 values per thread, far over 255 registers.
    offs = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs)
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(n_iter):
        acc = acc * v + i
        v = v + acc
    tl.store(out_ptr + offs, acc + v)
