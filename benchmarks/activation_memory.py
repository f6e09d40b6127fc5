"""Activation memory: bytes a block saves for backward, per token, measured with saved_tensors_hooks.

Every tensor autograd saves during one block's forward is recorded; tensors sharing a storage
(q, k, v as views of one projection) count once, and parameters do not count (they exist
anyway). The block's input counts when the block saves it. StableBlock is measured under every
recipe with the reference backend and with the Triton kernels (where they exist; on CPU under
Triton's interpreter), beside Hugging Face's GPT2Block with eager and SDPA attention, all in
training mode with dropout 0.
"""

from __future__ import annotations

import contextlib

import torch

import stableblocks as sb
from stableblocks.kernels import backend

from . import ops


def saved_bytes(module: torch.nn.Module, *args, **kwargs) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in module(*args, **kwargs)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*args, **kwargs)
    return sum(saved.values())


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


@contextlib.contextmanager
def _backend(name: str):
    previous = backend.get_backend()
    backend.set_backend(name)
    try:
        yield
    finally:
        backend.set_backend(previous)


def measure(recipes=None, d: int = 768, n_head: int = 12, T: int = 1024, B: int = 1,
            dtype: torch.dtype = torch.bfloat16, triton: bool = True, progress=None) -> list[dict]:
    """Rows of {block, backend, bytes_per_token, note}: StableBlock per recipe and backend, HF GPT2Block.

    triton=True adds StableBlock with backend "auto" under Triton's interpreter: ops with a kernel
    run it, the others their reference (named in the note); skipped when no op has a kernel.
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
            before = backend.LAUNCHES.copy()
            with _backend("auto"):
                n = saved_bytes(block, x)
            ran = sorted(k for k in backend.LAUNCHES if backend.LAUNCHES[k] > before[k])
            missing = sorted(set(ops.OPS) - backend.KERNELS)
            note = f"kernels: {', '.join(ran) or 'none'}" + (f"; reference for {', '.join(missing)} (no kernel yet)" if missing else "")
        else:
            with _backend("reference"):
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
