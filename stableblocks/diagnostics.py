"""Stability diagnostics of a StableGPT during training (SPEC.md section 6), cheap by design.

Every `diag_interval` steps the trainer collects:
- per-layer gradient norms (embedding, each block, final norm + head) from the gradients it has;
- per-matrix update ratio ||dW|| / ||W|| from a copy of the matrices taken before the step;
- a probe: one no-grad forward of a single sampled row of the step's batch, in eval mode and
  eager (under --compile too), with forward hooks that record Token Embedding Variability, the
  per-token L2 norm of the QKV, Proj and FC2 outputs, and the output logits' mean, largest |value| and log Z; and
  the max raw attention logit per layer (signed max of q k^T / sqrt(D) after QK-norm, before any
  cap, over the causal positions of every head), which the attention op reports itself
  (stableblocks.qk_clip.record_max_logits; on the kernel path no T x T scores are built).

The probe is a separate forward with its own hooks, registered and removed around it: the
training forward and backward run with no hook at all, so the numerics of training are
untouched, and the probe costs one row's forward. Hooks run inside each module's own forward,
where FSDP2 has gathered the module's full weights; gradients and update ratios read the local
shards and sum their squares across processes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .modules import StableAttention, StableEmbedding
from .qk_clip import record_max_logits


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _sum_across_shards(values: torch.Tensor, sharded: bool) -> torch.Tensor:
    if sharded and dist.is_initialized():
        dist.all_reduce(values)
    return values


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: 'embed', 'block{i}' or 'head' (final norm + LM head)."""
    if name.startswith("embed."):
        return "embed"
    if name.startswith("blocks."):
        return f"block{int(name.split('.')[1])}"
    return "head"


@torch.no_grad()
def grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """Gradient L2 norm per layer (see layer_of)."""
    names, sq, sharded = [], [], False
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            sharded |= isinstance(p.grad, DTensor)
            groups.setdefault(layer_of(name), []).append(_local(p.grad))
    for layer, grads in groups.items():
        names.append(layer)
        sq.append(sum(g.float().pow(2).sum() for g in grads))
    if not sq:
        return {}
    total = _sum_across_shards(torch.stack(sq), sharded)
    return dict(zip(names, total.sqrt().tolist()))


class UpdateRatio:
    """||W_after - W_before|| / ||W_before|| for every weight matrix (parameters with dim >= 2)."""

    def __init__(self, model: torch.nn.Module):
        self.params = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2 and p.requires_grad]
        self.before: list[torch.Tensor] | None = None

    @torch.no_grad()
    def snapshot(self) -> None:
        self.before = [_local(p).detach().clone() for _, p in self.params]

    @torch.no_grad()
    def ratios(self) -> dict[str, float]:
        if self.before is None:
            return {}
        sharded = any(isinstance(p, DTensor) for _, p in self.params)
        sq = torch.stack([
            torch.stack([(_local(p).float() - b.float()).pow(2).sum(), b.float().pow(2).sum()])
            for (_, p), b in zip(self.params, self.before)
        ])
        sq = _sum_across_shards(sq, sharded)
        self.before = None
        return {n: (d / w) ** 0.5 if w > 0 else float("nan") for (n, _), (d, w) in zip(self.params, sq.tolist())}


def _token_norm(t: torch.Tensor) -> float:
    """Mean over tokens of the L2 norm over the features of each token."""
    return t.float().flatten(2).norm(dim=-1).mean().item()


@torch.no_grad()
def probe(model: torch.nn.Module, idx: torch.Tensor, autocast=contextlib.nullcontext) -> dict:
    """One eager no-grad forward of `idx` (a (1, T) row) with recording hooks; see the module doc.

    `model` is what the trainer calls (a plain or FSDP2 StableGPT; under DDP its inner module).
    """
    out: dict = {"attn_logit_max": [], "qkv_out_norm": [], "proj_out_norm": [], "fc2_out_norm": []}

    def on_embedding(m, args, y):
        w = m.wte.weight.float()
        row_std = w.std(dim=1, correction=0)
        out["tev_mean"], out["tev_std"] = row_std.mean().item(), row_std.std(correction=0).item()

    def on_attention(m, args, y):
        q, k, v = m.qkv(args[0])
        out["qkv_out_norm"].append(torch.cat([q, k, v], dim=-1).float().flatten(2).norm(dim=-1).mean().item())

    def record(key):
        return lambda m, args, y: out[key].append(_token_norm(y))

    hooks = []
    for m in model.modules():
        if isinstance(m, StableEmbedding):
            hooks.append(m.register_forward_hook(on_embedding))
        elif isinstance(m, StableAttention):
            hooks.append(m.register_forward_hook(on_attention))
            hooks.append(m.c_proj.register_forward_hook(record("proj_out_norm")))
    for block in getattr(model, "blocks", []):
        hooks.append(block.mlp.c_proj.register_forward_hook(record("fc2_out_norm")))
    was_training = model.training
    model.eval()
    try:
        with torch.compiler.set_stance("force_eager"), autocast(), record_max_logits(model) as max_logits:
            logits, _ = model(idx)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    out["attn_logit_max"] = [m.max().item() for m in max_logits.values()]
    logits = logits.float()
    out["logit_mean"] = logits.mean().item()
    out["log_z"] = torch.logsumexp(logits, dim=-1).mean().item()
    out["logit_absmax"] = logits.abs().max().item()
    return out
