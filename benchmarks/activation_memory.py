"""Activation memory: bytes a block saves for backward, per token, measured with saved_tensors_hooks.

Every tensor autograd saves during one block's forward is recorded; tensors sharing a storage
(q, k, v as views of one projection) count once, and parameters do not count (they exist
anyway). The block's input counts when the block saves it. StableBlock is measured under every
recipe with the reference backend and with the Triton kernels (where they exist), beside Hugging
Face's GPT2Block with eager and SDPA attention, all in training mode with dropout 0.

The forward runs on fake tensors (FakeTensorMode, CPU device): every op dispatches as on CPU and
saves what it would save, but nothing is computed, so a T = 1024 block with Triton ops (their
registered fake kernels stand in for the launches) takes a second instead of the interpreter's
minutes. tests/test_benchmarks.py checks that fake and real runs save the same bytes.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_flatten, tree_map_only

import stableblocks as sb
from stableblocks.kernels import backend

from . import ops


def saved_bytes(module: torch.nn.Module, *args, fake: bool = True, seen_ops: set | None = None, **kwargs) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in module(*args, **kwargs),
    on fake tensors (nothing computed) or, with fake=False, real ones. `seen_ops` collects the
    stableblocks custom ops in the autograd graph (the Triton kernels' entry points)."""
    state = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers())
    context = contextlib.nullcontext()
    if fake:
        context = mode = FakeTensorMode()
        state = {name: mode.from_tensor(t) for name, t in state.items()}
        args, kwargs = tree_map_only(torch.Tensor, mode.from_tensor, (args, kwargs))
    params = {t.untyped_storage()._cdata for t in state.values()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return t

    with context, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = torch.func.functional_call(module, state, args, kwargs)
    if seen_ops is not None:
        seen_ops |= _custom_ops_in_graph(out)
    return sum(saved.values())


def _custom_ops_in_graph(out) -> set[str]:
    """Names of the stableblocks custom ops whose backward nodes are in out's autograd graph."""
    names, seen = set(), set()
    stack = [t.grad_fn for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        found = re.fullmatch(r"GeneratedBackwardFor_stableblocks_(\w+?)_default(?:Backward)?", type(node).__name__)
        if found:
            names.add(found.group(1))
        stack += [f for f, _ in node.next_functions]
    return names


def stable_block(recipe: str, d: int, n_head: int, T: int, dtype: torch.dtype) -> torch.nn.Module:
    cfg = sb.recipe(recipe, n_embd=d, n_head=n_head, block_size=T, dropout=0.0)
    return sb.StableBlock(cfg).to(dtype).train()


def hf_block(attn_implementation: str, d: int, n_head: int, T: int, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    cfg = GPT2Config(n_embd=d, n_head=n_head, n_positions=T, resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.0)
    cfg._attn_implementation = attn_implementation
    return GPT2Block(cfg, layer_idx=0).to(dtype).train()


def hf_causal_mask(T: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive causal mask GPT2Model builds for eager attention (it is shared by all blocks)."""
    mask = torch.full((T, T), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]


def measure(recipes=None, d: int = 768, n_head: int = 12, T: int = 1024, B: int = 1,
            dtype: torch.dtype = torch.bfloat16, triton: bool = True, progress=None) -> list[dict]:
    """Rows of {block, backend, bytes_per_token, note}: StableBlock per recipe and backend, HF GPT2Block.

    triton=True adds StableBlock with backend "auto" (TRITON_INTERPRET=1 makes it choose the kernels
    for CPU tensors): ops with a kernel take it, the others their reference (named in the note);
    skipped when no op has a kernel.
    """
    recipes = list(sb.recipes()) if recipes is None else list(recipes)
    tokens = B * T
    x = torch.randn(B, T, d, dtype=dtype, generator=torch.Generator().manual_seed(0)).requires_grad_()
    rows = []
    runs = [(r, "reference") for r in recipes]
    if triton:
        runs += [(r, "triton") for r in recipes]
    for recipe, which in runs:
        if progress:
            progress(f"StableBlock {recipe} ({which})")
        block = stable_block(recipe, d, n_head, T, dtype)
        note = ""
        if which == "triton":
            if not backend.KERNELS:
                rows.append({"block": f"StableBlock:{recipe}", "backend": which, "bytes_per_token": None,
                             "note": "no kernel yet"})
                continue
            if not backend.interpreting():
                raise RuntimeError("the Triton backend on CPU needs TRITON_INTERPRET=1 before triton is imported")
            seen = set()
            with backend.using("auto"):
                n = saved_bytes(block, x, seen_ops=seen)
            missing = sorted(set(ops.OPS) - backend.KERNELS)
            note = f"kernel ops: {', '.join(sorted(seen)) or 'none'}" + (
                f"; reference for {', '.join(missing)} (no kernel yet)" if missing else "")
        else:
            with backend.using("reference"):
                n = saved_bytes(block, x)
        rows.append({"block": f"StableBlock:{recipe}", "backend": which, "bytes_per_token": n / tokens, "note": note})
    for impl in ("eager", "sdpa"):
        if progress:
            progress(f"GPT2Block ({impl})")
        block = hf_block(impl, d, n_head, T, dtype)
        mask = hf_causal_mask(T, dtype) if impl == "eager" else None
        n = saved_bytes(block, x, attention_mask=mask)
        rows.append({"block": "hf:GPT2Block", "backend": impl, "bytes_per_token": n / tokens, "note": ""})
    return rows
