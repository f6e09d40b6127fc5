"""Test set-up: Triton's interpreter for CPU kernel tests, the reference backend by default."""

import os
import tempfile

# STABLEBLOCKS_TEST_DEVICE=cuda runs the same tests on CUDA tensors with compiled kernels
# (python -m benchmarks.gpu_check); otherwise, before any import of triton, the interpreter.
DEVICE = os.environ.get("STABLEBLOCKS_TEST_DEVICE", "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"STABLEBLOCKS_TEST_DEVICE={DEVICE!r}: expected 'cpu' or 'cuda'")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
# A fresh Inductor cache per run: its FX-graph cache does not see a changed custom-op schema.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="stableblocks-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402

import stableblocks  # noqa: E402
from _device import on_device  # noqa: E402


@pytest.fixture(autouse=True)
def reference_backend():
    """Model, training and integration tests run at reference speed; kernel tests opt in."""
    stableblocks.set_backend("reference")
    torch.manual_seed(0)
    with on_device(DEVICE):
        yield
    stableblocks.set_backend("reference")


@pytest.fixture
def aot():
    """kernels/aot.py, or a skip when Triton's ptxas for sm_80 / sm_90a is not at hand."""
    from stableblocks.kernels import aot

    if DEVICE != "cpu":  # compiling for both architectures needs no GPU: the CPU suite checks it
        pytest.skip("ahead-of-time compile checks run in the CPU suite")

    try:
        aot._ptxas(80), aot._ptxas(90)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    return aot


@pytest.fixture
def triton_backend():
    stableblocks.set_backend("triton")
    yield
    stableblocks.set_backend("reference")
