"""SPEC.md's tolerance rule (FlashAttention's): judge a kernel by what PyTorch itself gets wrong.

Against a float64 reference, the kernel's max error must be at most 2x (forward) or 3x
(gradients) the max error of the plain-PyTorch reference run in the input dtype, plus an
absolute floor per dtype.
"""

from __future__ import annotations

import torch

FLOORS = {
    "forward": {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3},
    "grad": {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3},
    "attention_grad": {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-3},
}
FACTORS = {"forward": 2.0, "grad": 3.0, "attention_grad": 3.0}


def max_error(t: torch.Tensor, oracle: torch.Tensor) -> float:
    assert t.shape == oracle.shape, (t.shape, oracle.shape)
    return (t.double() - oracle.double()).abs().max().item() if t.numel() else 0.0


def assert_within_tolerance(kernel: torch.Tensor, torch_same_dtype: torch.Tensor, oracle: torch.Tensor,
                            dtype: torch.dtype, kind: str = "forward", what: str = "") -> None:
    """kernel: the Triton result; torch_same_dtype: the reference run in `dtype`; oracle: float64."""
    assert torch.isfinite(kernel).all(), f"{what}: non-finite values"
    err, base = max_error(kernel, oracle), max_error(torch_same_dtype, oracle)
    bound = FACTORS[kind] * base + FLOORS[kind][dtype]
    assert err <= bound, f"{what}: max error {err:.3g} > {FACTORS[kind]} x PyTorch's {base:.3g} + {FLOORS[kind][dtype]:g}"
