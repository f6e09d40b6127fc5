"""The microbenchmarks as a pytest-benchmark suite (run from the repository root):

    python -m pytest benchmarks/test_microbench.py --benchmark-only [-k "fused_attention and forward"]

One GPT-2 small shape per op (B=8, T=1024, d=768, heads of 64, bf16 with fp32 weights) on CUDA; a small fp32 one
on CPU, where the Triton provider is skipped (interpreter timings mean nothing).
STABLEBLOCKS_BENCH_SHAPE="B=1 T=64 d=64 D=32" overrides the shape.
"""

import os

import pytest
import torch

from benchmarks import ops, results

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = ops.TRAINING_DTYPE if DEVICE == "cuda" else torch.float32
PARAM_DTYPE = ops.TRAINING_PARAM_DTYPE
_shape = dict(B=8, T=1024, d=768, D=64) if DEVICE == "cuda" else dict(B=1, T=128, d=768, D=64)
_shape.update(results.parse_shape(os.environ.get("STABLEBLOCKS_BENCH_SHAPE", "")))
SHAPE = ops.Shape(**_shape)

PARAMS = [pytest.param(case, provider, mode, id=f"{case.name}-{provider}-{mode}")
          for case in ops.CASES for provider in ops.providers(case, DEVICE) for mode in ops.MODES]


@pytest.mark.parametrize("case,provider,mode", PARAMS)
def test_op(benchmark, case, provider, mode):
    why = ops.unavailable(case, provider, DEVICE, mode)
    if why:
        pytest.skip(why)
    if not case.valid(SHAPE):
        pytest.skip(f"head width {SHAPE.D} does not divide d = {SHAPE.d}")
    step = ops.step_fn(ops.provider_fn(case, provider, DEVICE), ops.make_inputs(case, SHAPE, DTYPE, DEVICE, param_dtype=PARAM_DTYPE), mode)
    fn = step
    if DEVICE == "cuda":
        def fn():
            step()
            torch.cuda.synchronize()
    benchmark.extra_info.update(shape=case.shape_label(SHAPE, DTYPE, PARAM_DTYPE), device=results.device_name(DEVICE),
                                unavoidable_bytes=ops.unavoidable_bytes(case, SHAPE, DTYPE, PARAM_DTYPE)[mode])
    benchmark(fn)
