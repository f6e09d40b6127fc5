"""Running the kernel tests on a GPU: STABLEBLOCKS_TEST_DEVICE=cuda (read by conftest.py).

The tests build their inputs with CPU factory calls (often with a seeded CPU generator). Under
`on_device("cuda")` every factory call that names no device still draws on the CPU, so the values
are the same as in a CPU run, and its result moves to the GPU: the same test functions then run
the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_FACTORIES = {torch.randn, torch.rand, torch.randint, torch.randperm, torch.zeros, torch.ones, torch.empty,
              torch.full, torch.tensor, torch.arange, torch.linspace, torch.eye, torch.empty_strided}


class _Factories(TorchFunctionMode):
    def __init__(self, device: str):
        super().__init__()
        self.device = torch.device(device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _FACTORIES or kwargs.get("device") is not None:
            return func(*args, **kwargs)
        grad = kwargs.pop("requires_grad", False)
        return func(*args, **kwargs).to(self.device).requires_grad_(grad)


@contextlib.contextmanager
def on_device(device: str):
    if device == "cpu":
        yield
        return
    with _Factories(device):
        yield
