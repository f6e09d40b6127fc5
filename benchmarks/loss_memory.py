"""Memory of the loss step: LM head + cross-entropy, forward and backward, from allocations.

Three paths on the same inputs (hidden (N, d) in the activation dtype, weight (V, d), int64
targets): "eager" is the materialising formula GPT-2 training uses today (logits = h W^T in the
activation dtype, upcast to fp32, F.cross_entropy); "reference" and "triton" are
fused_linear_cross_entropy's chunked reference and its Triton path.

LiveBytes, a dispatch mode, tracks every storage an op creates until it is freed: the bytes
alive after forward (what backward keeps) and the peak over forward + backward, both on top of
the inputs (the returned gradients count: every path has them). The step runs on fake tensors
(FakeTensorMode: every op allocates as on CPU, nothing is computed), so GPT-2's sizes take
seconds. The Triton path's launcher allocates its buffers (the d u chunk, the fp32 d weight)
inside a custom op, out of the mode's sight: for the measurement its backward runs the launcher's
own Python with the kernel launches stubbed out, so every buffer it allocates is seen.
tests/test_benchmarks.py checks that fake and real runs (kernels in the interpreter) agree.
"""

from __future__ import annotations

import contextlib
import importlib
import weakref
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from stableblocks.kernels import backend

flce = importlib.import_module("stableblocks.kernels.fused_linear_cross_entropy")  # the module, not the op

PATHS = ("eager", "reference", "triton")
# Published anchors (their own configs; peak GPU memory of forward + backward as they measure it).
ANCHORS = [
    dict(name="Cut Cross-Entropy (paper, README)", config="Gemma 2 2B head: N=8192, d=2304, V=256000, bf16, A100",
         eager_mb=28000.0, fused_mb=1164.0, note="op memory of loss fw+bw: baseline 28000 MB, torch.compile 16000 MB, CCE 1164 MB "
         "(github.com/apple/ml-cross-entropy README)"),
    dict(name="Liger-Kernel FLCE (benchmark CSV)", config="N=8192, d=4096, V=128256, bf16 weights, H100",
         eager_mb=9103.5, fused_mb=4408.0, note="peak allocated incl. inputs, weight and its gradient: Hugging Face 9103 MB, "
         "Liger 4408 MB (benchmark/fused_linear_cross_entropy_memory/nvidia_h100_80gb_hbm3)"),
]


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under the mode that are still alive, and their peak.

    A storage counts once however many tensors view it; storages of `existing` tensors (the
    inputs) never count. `mark()` records the live bytes at a point (e.g. after forward).
    """

    def __init__(self, existing=()):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}
        self._known = {id(t.untyped_storage()) for t in existing}
        self._keep = [t.untyped_storage() for t in existing]  # their ids stay theirs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = id(storage)
        if key in self._sizes or key in self._known:
            return
        self._sizes[key] = storage.nbytes()
        self.live += self._sizes[key]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


class _NoLaunch:
    """Stands in for a Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _launcher_in_sight(fake: bool):
    """Run the Triton backward's launcher as plain Python (its allocations visible to LiveBytes);
    on fake tensors its kernel launches do nothing and its buffers are sized as on a GPU."""
    from stableblocks.kernels import fused_linear_cross_entropy_triton as tri

    patches = [mock.patch.object(tri, "fused_linear_cross_entropy_bwd", tri.fused_linear_cross_entropy_bwd._init_fn)]
    if fake:  # the GPU's tiles (they set the d u chunk), without launching anything
        tiles = tri.tiles
        patches += [mock.patch.object(tri, name, _NoLaunch()) for name in ("_linear_cross_entropy_bwd_logits", "_linear_cross_entropy_matmul")]
        patches += [mock.patch.object(backend, "interpreting", lambda: True),
                    mock.patch.object(tri, "tiles", lambda dtype, interpreting=False: tiles(dtype))]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def _loss(path: str, h, w, t):
    if path == "eager":
        return flce.materialising(h, w, t)
    with backend.using(path):
        return flce.fused_linear_cross_entropy(h, w, t)


def measure_step(path: str, N: int, d: int, V: int, dtype=torch.bfloat16, param_dtype=torch.float32,
                 fake: bool = True, seed: int = 0) -> dict:
    """{path, held_after_forward, peak, gradients} in bytes for one forward + backward of the loss
    over N tokens, above the inputs."""
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    if path == "triton" and not fake and not backend.interpreting():
        raise RuntimeError("a real Triton run on CPU needs TRITON_INTERPRET=1 before triton is imported")
    context = contextlib.ExitStack()
    # Without argument validation (a few O(N) masks): it reads target values, which fake tensors lack.
    context.enter_context(mock.patch.object(flce, "_check", lambda *args: None))
    if fake:
        context.enter_context(FakeTensorMode())
    if path == "triton":
        context.enter_context(_launcher_in_sight(fake))
    with context:
        gen = None if fake else torch.Generator().manual_seed(seed)
        h = (torch.randn(N, d, generator=gen) if not fake else torch.empty(N, d)).to(dtype).requires_grad_()
        w = (torch.randn(V, d, generator=gen) * 0.02 if not fake else torch.empty(V, d)).to(param_dtype).requires_grad_()
        t = torch.randint(V, (N,), generator=gen) if not fake else torch.empty(N, dtype=torch.int64)
        with LiveBytes(existing=(h, w, t)) as mem:
            loss = _loss(path, h, w, t)
            held = mem.live
            grads = torch.autograd.grad(loss, (h, w))
            del loss
            grad_bytes = sum(g.untyped_storage().nbytes() for g in grads)
        return dict(path=path, held_after_forward=held, peak=mem.peak, gradients=grad_bytes)


def measure(N: int = 8192, d: int = 768, V: int = 50257, dtype=torch.bfloat16, param_dtype=torch.float32,
            check_N=(512, 2048), real_paths=("eager", "reference"), progress=None) -> dict:
    """The three paths at (N, d, V) on fake tensors, their peaks at N/8, N/4, N/2 (the scaling in
    N), and fake-vs-real checks of the peak at the token counts `check_N` (real runs on CPU)."""
    from . import ops

    rows = []
    for path in PATHS:
        if progress:
            progress(f"loss memory {path}")
        rows.append(measure_step(path, N, d, V, dtype, param_dtype))
        rows[-1]["scaling"] = [[n, measure_step(path, n, d, V, dtype, param_dtype)["peak"]] for n in (N // 8, N // 4, N // 2)]
    eager = rows[0]["peak"]
    for r in rows:
        r["ratio_vs_eager"] = r["peak"] / eager
    checks = []
    for n in check_N:
        for path in real_paths:
            if progress:
                progress(f"loss memory check {path} N={n}")
            fake, real = (measure_step(path, n, d, V, dtype, param_dtype, fake=f)["peak"] for f in (True, False))
            checks.append(dict(path=path, N=n, fake_peak=fake, real_peak=real))
    return dict(N=N, d=d, V=V, dtype=ops.dtype_name(dtype), param_dtype=ops.dtype_name(param_dtype), rows=rows,
                checks=checks, anchors=ANCHORS)
