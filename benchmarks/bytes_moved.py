"""Bytes moved, measured on CPU: Triton kernels under the interpreter, eager ops at the dispatcher.

Two counters:

- ``TritonTraffic`` patches Triton's interpreter (TRITON_INTERPRET=1) so that every load, store
  and atomic of every program instance is recorded: masked-in elements x element size, per kernel
  launch and per kernel argument. *Requested* bytes are what the kernel asks the memory system
  for; they equal DRAM traffic only without cache reuse (the standard model, and the one
  FlashAttention-2's traffic model uses). *Unique* bytes count each distinct address once per
  launch (an ideal cache). The cost model's figure, *modeled* bytes, is requested bytes except
  for the op's weights (the (d,) or (D,) vectors every program reads, the embedding tables),
  which count once per launch: they stay in L2.
- ``AtenTraffic`` is a TorchDispatchMode that sums, for each aten op, the bytes of its tensor
  inputs and outputs (views are free; a broadcast input counts its distinct elements; an
  embedding reads only the gathered rows). It counts the eager composition, and the PyTorch ops
  a Triton launcher runs around its kernels (allocation, partial-sum reductions, copies).

``measure(case, shape, dtype)`` runs one case forward and backward under both and returns the
kernel's bytes beside the eager composition's and the unavoidable bytes; for attention it adds
FlashAttention-2's traffic model for the block sizes the kernel actually used.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._pytree import tree_flatten

from stableblocks.kernels import backend

from . import ops

_state = threading.local()


def _in_launch() -> bool:
    return getattr(_state, "launch", None) is not None


# --- Triton kernels under the interpreter ----------------------------------------------------------


@dataclass
class ArgTraffic:
    """One kernel argument's traffic in one launch (arguments sharing a storage are merged)."""

    read: int = 0  # requested bytes
    write: int = 0
    read_unique: int = 0
    write_unique: int = 0
    weight: bool = False  # one of the op's weights: modeled as read once per launch

    @property
    def requested(self) -> int:
        return self.read + self.write

    @property
    def unique(self) -> int:
        return self.read_unique + self.write_unique

    @property
    def modeled(self) -> int:
        return self.unique if self.weight else self.requested


@dataclass
class Launch:
    kernel: str
    grid: tuple
    constexprs: dict
    args: dict[str, ArgTraffic] = field(default_factory=dict)
    flops: int = 0  # 2 M N K per tl.dot of an (M, K) by (K, N) tile, masked lanes included (the GPU does them)

    @property
    def requested(self) -> int:
        return sum(a.requested for a in self.args.values())

    @property
    def unique(self) -> int:
        return sum(a.unique for a in self.args.values())

    @property
    def modeled(self) -> int:
        return sum(a.modeled for a in self.args.values())


class _Recorder:
    """The launch being interpreted: its arguments' storages and the addresses it touched."""

    def __init__(self, kernel: str, weights: set[int]):
        self.kernel = kernel
        self.weights = weights  # storage addresses of the op's weights
        self.storages: dict[int, tuple[int, str]] = {}  # start address -> (nbytes, argument names)
        self.constexprs: dict = {}
        self.accesses: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)  # (kind, elt) -> addrs
        self.flops = 0

    def bind(self, named_args: dict, constexpr_names) -> None:
        for name, value in named_args.items():
            if name in constexpr_names:
                self.constexprs[name] = value
            elif hasattr(value, "data_ptr") and hasattr(value, "untyped_storage"):
                storage = value.untyped_storage()
                start, nbytes = storage.data_ptr(), storage.nbytes()
                old = self.storages.get(start)
                label = name if old is None else f"{old[1]}+{name}"
                self.storages[start] = (max(nbytes, old[0] if old else 0), label)

    def record(self, kind: str, ptrs: np.ndarray, mask: np.ndarray | None, elt: int) -> None:
        addrs = ptrs if mask is None else ptrs[np.broadcast_to(mask, ptrs.shape)]
        if addrs.size:
            self.accesses[kind, elt].append(np.asarray(addrs, dtype=np.uint64).ravel())

    def finish(self, grid: tuple) -> Launch:
        launch = Launch(self.kernel, tuple(int(g) for g in grid), dict(self.constexprs), flops=self.flops)
        starts = np.array(sorted(self.storages), dtype=np.uint64)
        labels = [self.storages[int(s)][1] for s in starts]
        ends = np.array([int(s) + self.storages[int(s)][0] for s in starts], dtype=np.uint64)
        for (kind, elt), chunks in self.accesses.items():
            addrs = np.concatenate(chunks)
            slot = np.searchsorted(starts, addrs, side="right") - 1
            inside = (slot >= 0) & (addrs < ends[np.clip(slot, 0, None)]) if len(starts) else np.zeros(len(addrs), bool)
            for i in np.unique(slot[inside]):
                hit = addrs[inside & (slot == i)]
                self._add(launch, labels[i], kind, elt, hit, int(starts[i]) in self.weights)
            if not inside.all():
                self._add(launch, "<outside every argument>", kind, elt, addrs[~inside], False)
        return launch

    @staticmethod
    def _add(launch: Launch, label: str, kind: str, elt: int, addrs: np.ndarray, weight: bool) -> None:
        a = launch.args.setdefault(label, ArgTraffic(weight=weight))
        requested, unique = len(addrs) * elt, len(np.unique(addrs)) * elt
        if kind == "read":
            a.read += requested
            a.read_unique += unique
        else:
            a.write += requested
            a.write_unique += unique


class TritonTraffic:
    """Context manager: record every interpreted Triton launch's loads and stores (and its tl.dot
    FLOPs) in `.launches`.

    `weights`: tensors whose storages count as the op's weights (see ArgTraffic.modeled).
    """

    def __init__(self, weights=()):
        self.launches: list[Launch] = []
        self.weights = {t.untyped_storage().data_ptr() for t in weights}

    def __enter__(self):
        if not backend.interpreting():
            raise RuntimeError("TritonTraffic counts bytes under Triton's interpreter: set TRITON_INTERPRET=1 "
                               "before triton is imported (python -m benchmarks.cost_model does)")
        from triton.runtime import interpreter as interp

        self._interp = interp
        builder, executor = interp.InterpreterBuilder, interp.GridExecutor
        self._saved = [(builder, name, getattr(builder, name)) for name in
                       ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas",
                        "create_dot")]
        self._saved += [(executor, name, getattr(executor, name)) for name in ("__call__", "_init_args_hst")]
        orig = {name: fn for _, name, fn in self._saved}
        launches, weights = self.launches, self.weights

        def elt(ptrs) -> int:
            return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)

        def masked_load(b, ptrs, mask, other, cache_policy, is_volatile):
            _state.launch.record("read", ptrs.data, mask.data, elt(ptrs))
            return orig["create_masked_load"](b, ptrs, mask, other, cache_policy, is_volatile)

        def masked_store(b, ptrs, value, mask, cache_policy):
            _state.launch.record("write", ptrs.data, mask.data, elt(ptrs))
            return orig["create_masked_store"](b, ptrs, value, mask, cache_policy)

        def atomic_rmw(b, op, ptr, val, mask, sem, scope):  # an atomic reads and writes
            for kind in ("read", "write"):
                _state.launch.record(kind, ptr.data, mask.data, elt(ptr))
            return orig["create_atomic_rmw"](b, op, ptr, val, mask, sem, scope)

        def atomic_cas(b, ptr, cmp, val, sem, scope):
            for kind in ("read", "write"):
                _state.launch.record(kind, ptr.data, None, elt(ptr))
            return orig["create_atomic_cas"](b, ptr, cmp, val, sem, scope)

        def dot(b, a, bb, d, *args):
            *_, m, k = a.data.shape
            _state.launch.flops += 2 * m * k * bb.data.shape[-1] * int(np.prod(a.data.shape[:-2], dtype=np.int64))
            return orig["create_dot"](b, a, bb, d, *args)

        def init_args(ex, args_dev, kwargs):
            args_hst, kwargs_hst = orig["_init_args_hst"](ex, args_dev, kwargs)
            _state.launch.bind({**dict(zip(ex.arg_names, args_hst)), **kwargs_hst}, ex.constexprs)
            return args_hst, kwargs_hst

        def call(ex, *args, **kwargs):
            _state.launch = _Recorder(ex.fn.__name__, weights)
            try:
                out = orig["__call__"](ex, *args, **kwargs)
                launches.append(_state.launch.finish(interp.interpreter_builder.grid_dim))
                return out
            finally:
                _state.launch = None

        for cls, name, fn in ((builder, "create_masked_load", masked_load), (builder, "create_masked_store", masked_store),
                              (builder, "create_atomic_rmw", atomic_rmw), (builder, "create_atomic_cas", atomic_cas),
                              (builder, "create_dot", dot),
                              (executor, "_init_args_hst", init_args), (executor, "__call__", call)):
            setattr(cls, name, fn)
        return self

    def __exit__(self, *exc):
        for cls, name, fn in self._saved:
            setattr(cls, name, fn)
        return False

    @property
    def requested(self) -> int:
        return sum(launch.requested for launch in self.launches)

    @property
    def unique(self) -> int:
        return sum(launch.unique for launch in self.launches)

    @property
    def modeled(self) -> int:
        return sum(launch.modeled for launch in self.launches)

    @property
    def flops(self) -> int:
        return sum(launch.flops for launch in self.launches)


# --- aten ops at the dispatcher ---------------------------------------------------------------------

_FREE = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
         "_local_scalar_dense", "set_", "resize_", "_assert_tensor_metadata", "sym_size", "sym_stride", "sym_numel")
_WRITE_ONLY_SELF = ("copy_", "fill_", "zero_")
_GATHER_ROWS = {"embedding": ("indices", "weight"), "index_select": ("index", "self")}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (a broadcast dimension counts once)."""
    if t.numel() == 0:
        return 0
    return math.prod(n for n, s in zip(t.shape, t.stride()) if s != 0) * t.element_size()


@dataclass
class OpTraffic:
    name: str
    read: int
    write: int


class AtenTraffic(TorchDispatchMode):
    """Sum each aten op's input and output bytes; custom ops are entered and their aten ops counted
    (a Triton launcher's own work), while the interpreter's host copies during a launch are not."""

    def __init__(self):
        super().__init__()
        self.ops: list[OpTraffic] = []
        self.custom_ops: list[str] = []

    @property
    def total(self) -> int:
        return sum(o.read + o.write for o in self.ops)

    def by_op(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for o in self.ops:
            out[o.name] += o.read + o.write
        return dict(out)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _in_launch():
            return func(*args, **kwargs)
        if func.namespace not in ("aten", "prim"):
            self.custom_ops.append(func.name())
            device = next((t.device for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)), None)
            key = torch._C.DispatchKey.CUDA if device is not None and device.type == "cuda" else torch._C.DispatchKey.CPU
            with self:  # run the op's kernel for this device with the mode on: its aten ops are counted
                return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        out = func(*args, **kwargs)
        read, write = self._bytes(func, args, kwargs, out)
        if read or write:
            self.ops.append(OpTraffic(func.name(), read, write))
        return out

    @staticmethod
    def _bytes(func, args, kwargs, out) -> tuple[int, int]:
        name = func._schema.name.split("::")[-1]
        if name in _FREE or any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            return 0, 0  # views and allocations move nothing
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        write = sum(tensor_bytes(t) for t in outs)
        bound = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
        if name.endswith("_like") or name.startswith("new_"):
            return 0, write  # factories: the argument gives only a shape and dtype
        if name in _GATHER_ROWS:  # only the gathered rows are read, not the whole table
            index, _ = _GATHER_ROWS[name]
            return tensor_bytes(bound[index]) + write, write
        read = 0
        for arg in func._schema.arguments:
            value = bound.get(arg.name)
            written = arg.alias_info is not None and arg.alias_info.is_write
            if written and (name in _WRITE_ONLY_SELF or not name.endswith("_")):
                continue  # an out= argument or a destination: written, not read
            read += sum(tensor_bytes(t) for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))
        return read, write


# --- one case, forward and backward ----------------------------------------------------------------


@dataclass
class PassBytes:
    """One pass (forward or backward) of one provider."""

    kernel_requested: int = 0  # Triton loads + stores (no cache)
    kernel_unique: int = 0  # each distinct address once per launch
    kernel_modeled: int = 0  # requested, the op's weights once per launch
    kernel_flops: int = 0  # tl.dot FLOPs
    torch_bytes: int = 0  # aten ops at the dispatcher (the whole pass for eager; launcher work for Triton)
    torch_flops: int = 0  # their matmul FLOPs (torch.utils.flop_counter)
    launches: list[Launch] = field(default_factory=list)
    aten: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.kernel_modeled + self.torch_bytes


def count_passes(fn, inputs: ops.Inputs, triton: bool) -> dict[str, PassBytes]:
    """Run fn forward, then backward, counting each pass's bytes."""
    result = {}
    with backend.using("triton" if triton else "reference"):
        for mode in ("forward", "backward"):
            kernels = TritonTraffic(inputs.weights) if triton else contextlib.nullcontext()
            aten, flops = AtenTraffic(), FlopCounterMode(display=False)
            if mode == "forward":
                with kernels, flops, aten:
                    outs = ops.as_tuple(fn(*inputs.args, **inputs.kwargs))
                grads = [torch.randn_like(o) for o in outs]
            else:
                with kernels, flops, aten:
                    torch.autograd.grad(outs, inputs.leaves, grads, allow_unused=True)
            p = PassBytes(torch_bytes=aten.total, torch_flops=flops.get_total_flops(), aten=aten.by_op())
            if triton:
                p.launches = kernels.launches
                p.kernel_requested, p.kernel_unique, p.kernel_modeled = kernels.requested, kernels.unique, kernels.modeled
                p.kernel_flops = kernels.flops
            result[mode] = p
    return result


def fa2_model(shape: ops.Shape, a: int, block_m: int, block_n: int, causal: bool = True) -> dict[str, int]:
    """FlashAttention-2's HBM traffic for attention over (B, T, H, D), element size a bytes.

    Forward: each query block of block_m rows reads its Q once and re-reads K and V for every
    key block it visits (all, or up to the diagonal when causal), then writes O and the fp32 LSE.
    Backward (FA2's Algorithm 2): a pre-pass reads O and dO and writes delta (fp32); each key
    block reads K, V once, and for every query block that sees it re-reads Q, dO, LSE, delta and
    accumulates dQ in fp32 (a read and a write); it writes dK, dV; a last pass converts dQ.
    """
    B, T, H, D = shape.B, shape.T, shape.H, shape.D
    n_q, n_k = math.ceil(T / block_m), math.ceil(T / block_n)

    def kv_rows(i):  # key rows loaded by query block i
        if not causal:
            return T
        return min(T, math.ceil(min(T, (i + 1) * block_m) / block_n) * block_n)

    fwd = T * D * a + sum(2 * kv_rows(i) * D * a for i in range(n_q)) + T * D * a + T * 4

    def q_rows(j):  # query rows that see key block j
        if not causal:
            return T
        first = (j * block_n) // block_m * block_m
        return T - first

    pre = 2 * T * D * a + T * 4
    main = sum(2 * min(block_n, T - j * block_n) * D * a * 2  # K, V in; dK, dV out
               + q_rows(j) * (2 * D * a + 2 * 4 + 2 * D * 4)  # Q, dO, LSE, delta in; dQ (fp32) in and out
               for j in range(n_k))
    post = T * D * 4 + T * D * a
    per_head = {"forward": fwd, "backward": pre + main + post}
    return {k: v * B * H for k, v in per_head.items()}


_BLOCK_M = ("BLOCK_M", "BLOCK_Q", "BM")
_BLOCK_N = ("BLOCK_N", "BLOCK_KV", "BLOCK_K", "BN")


def attention_blocks(launches: list[Launch]) -> tuple[int, int] | None:
    """(block_m, block_n) from the forward kernel's constexprs, if it names them conventionally."""
    for launch in launches:
        found = [next((int(launch.constexprs[k]) for k in names if k in launch.constexprs), None)
                 for names in (_BLOCK_M, _BLOCK_N)]
        if None not in found:
            return found[0], found[1]
    return None


@dataclass
class CaseBytes:
    case: ops.Case
    shape: ops.Shape
    dtype: torch.dtype
    param_dtype: torch.dtype
    unavoidable: dict[str, int]
    eager: dict[str, PassBytes]
    triton: dict[str, PassBytes] | None  # None: no kernel yet
    fa2: dict[str, int] | None = None
    blocks: tuple[int, int] | None = None
    note: str = ""

    def target(self, mode: str) -> int | None:
        """What the kernel is compared with: FA2's model for attention, else the unavoidable bytes."""
        if self.case.op == "fused_attention":
            return None if self.fa2 is None else self.fa2[mode]
        return self.unavoidable[mode]


def measure(case: ops.Case, shape: ops.Shape, dtype=torch.float32, param_dtype=None, seed: int = 0) -> CaseBytes:
    """Count one case's bytes on CPU: the eager composition always, the Triton kernel if it exists."""
    param_dtype = param_dtype or dtype
    inputs = ops.make_inputs(case, shape, dtype, "cpu", seed, param_dtype)
    eager = count_passes(ops.reference_fn(case.op), inputs, triton=False)
    unavoidable = ops.unavoidable_bytes(case, shape, dtype, param_dtype)
    result = CaseBytes(case, shape, dtype, param_dtype, {m: unavoidable[m] for m in ("forward", "backward")}, eager, None)
    if not case.has_kernel():
        result.note = "no kernel yet"
        return result
    result.triton = count_passes(ops.PUBLIC[case.op], inputs, triton=True)
    if case.op == "fused_attention":
        result.blocks = attention_blocks(result.triton["forward"].launches)
        if result.blocks is None:
            names = sorted({k for launch in result.triton["forward"].launches for k in launch.constexprs})
            result.note = f"FA2 model needs the kernel's block sizes; constexprs found: {names}"
        else:
            result.fa2 = fa2_model(shape, dtype.itemsize, *result.blocks)
    return result


def to_dict(r: CaseBytes) -> dict:
    """A JSON-able summary of one case: bytes per pass (totals, not per token)."""

    def passes(p: dict[str, PassBytes] | None, kernel: bool):
        if p is None:
            return None
        out = {}
        for mode, b in p.items():
            out[mode] = {"torch": b.torch_bytes, "aten": b.aten}
            if kernel:
                out[mode] |= {"requested": b.kernel_requested, "unique": b.kernel_unique, "modeled": b.kernel_modeled,
                              "launches": [{"kernel": l.kernel, "grid": list(l.grid), "constexprs": {k: v if isinstance(v, (int, float, str)) else str(v)
                                                                         for k, v in l.constexprs.items()},
                                            "requested": l.requested, "unique": l.unique, "modeled": l.modeled,
                                            "args": {k: [a.requested, a.unique, a.weight] for k, a in l.args.items()}}
                                           for l in b.launches]}
                out[mode]["total"] = b.total
        return out

    return {"case": r.case.name, "op": r.case.op, "shape": r.case.shape_label(r.shape, r.dtype, r.param_dtype), "tokens": r.shape.tokens,
            "unavoidable": r.unavoidable, "eager": passes(r.eager, False),
            "triton": passes(r.triton, True), "fa2": r.fa2, "blocks": r.blocks, "note": r.note}


# --- the fused loss's kernels ------------------------------------------------------------------------


@contextlib.contextmanager
def gpu_tiles():
    """The fused loss's launchers on the GPU's tiles under the interpreter (which otherwise takes the
    smallest tiles tl.dot allows): its weight re-reads and padded FLOPs depend on the tiles."""
    from stableblocks.kernels import fused_linear_cross_entropy_triton as flce

    tiles = flce.tiles
    flce.tiles = lambda dtype, interpreting=False: tiles(dtype)
    try:
        yield
    finally:
        flce.tiles = tiles


def loss_kernels(shape: ops.Shape, dtype=torch.float32, param_dtype=None) -> dict:
    """Bytes and FLOPs of fused_linear_cross_entropy's Triton kernels on the GPU's tiles, beside the
    materialising eager composition's aten ops and the matmul FLOPs the math needs (2 N V d forward;
    backward recomputes the logits and forms d hidden and d weight: 6 N V d). Totals per pass."""
    case = next(c for c in ops.CASES if c.op == "fused_linear_cross_entropy")
    param_dtype = param_dtype or dtype
    inputs = ops.make_inputs(case, shape, dtype, "cpu", 0, param_dtype)
    eager = count_passes(ops.reference_fn(case.op), inputs, triton=False)
    with gpu_tiles():
        kernel = count_passes(ops.PUBLIC[case.op], inputs, triton=True)
    # The tiles as launched: each kernel's BLOCK_* constexprs.
    tiles = {launch.kernel: {k: v for k, v in launch.constexprs.items() if k.startswith("BLOCK")}
             for p in kernel.values() for launch in p.launches}
    need = ops.unavoidable_bytes(case, shape, dtype, param_dtype)
    math_flops = 2 * shape.tokens * shape.vocab * shape.d
    out = {"shape": case.shape_label(shape, dtype, param_dtype), "tokens": shape.tokens, "tiles": tiles, "passes": {}}
    for mode, factor in (("forward", 1), ("backward", 3)):
        k, e = kernel[mode], eager[mode]
        out["passes"][mode] = {
            "unavoidable_bytes": need[mode], "math_flops": factor * math_flops,
            "kernel_requested": k.kernel_requested, "kernel_modeled": k.kernel_modeled, "kernel_flops": k.kernel_flops,
            "launcher_bytes": k.torch_bytes, "launcher_flops": k.torch_flops,
            "eager_bytes": e.torch_bytes, "eager_flops": e.torch_flops,
            "launches": sorted({launch.kernel for launch in k.launches})}
    return out
