"""Test set-up: Triton's interpreter for CPU kernel tests, the reference backend by default."""

import os
import tempfile

# Must precede any import of triton: kernels then run on CPU tensors in numpy.
os.environ["TRITON_INTERPRET"] = "1"
# A fresh Inductor cache per run: its FX-graph cache does not see a changed custom-op schema.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="stableblocks-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402

import stableblocks  # noqa: E402


@pytest.fixture(autouse=True)
def reference_backend():
    """Model, training and integration tests run at reference speed; kernel tests opt in."""
    stableblocks.set_backend("reference")
    torch.manual_seed(0)
    yield
    stableblocks.set_backend("reference")


@pytest.fixture
def triton_backend():
    stableblocks.set_backend("triton")
    yield
    stableblocks.set_backend("reference")
