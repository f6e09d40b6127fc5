"""QK-clip: after each optimizer step, bring every attention head whose largest logit passed tau
back to tau (MuonClip's per-head rule, Kimi K2; Megatron-LM's `qk_clip`; SPEC.md "QK-clip").

S_h is the signed max of head h's raw scaled logit scale * q.k over the visible positions of every
forward of the step (after any QK-norm, before the soft-cap), MAX-reduced over ranks, as the
attention kernel reports it (`fused_attention(..., return_max_logit=True)`; no T x T scores on the
kernel path). gamma_h = tau / S_h where S_h > tau, else 1, and what maps into the logits is
rescaled so that head's logits scale by exactly gamma_h, for the weights and layer inputs S was
measured on (a clipped layer changes what later layers see):

- no norm on q and k: head h's rows of W_q, b_q, W_k and b_k times sqrt(gamma_h) (under WeSaR the
  rows of W, never the gate shared by all heads; under MLRA the head's up-projection and up-bias);
- QK-norm / QKV-norm: their one (D,) weight and bias pair is shared by all heads, so (w_q, b_q,
  w_k, b_k) are multiplied by sqrt(min_h gamma_h). This over-clips every head but the largest: one
  head past tau scales down the logits of all heads of its layer.

In any training loop (also a Hugging Face GPT-2 patched with stableblocks), under DDP or FSDP2
too (every rank calls both; the MAX over ranks keeps replicas identical):

    clip = QKClip(model, tau=100.0)
    for batch in loader:
        with clip.recording():            # around the step's forward passes, every micro-batch
            loss = model(...); loss.backward()
        optimizer.step()
        clip.apply()                       # after the step
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from .modules import StableAttention


class ClipResult(NamedTuple):
    max_logit: dict[str, torch.Tensor]  # module name -> (H,) S_h, reduced over micro-batches and ranks
    factor: dict[str, torch.Tensor]  # module name -> (H,) gamma_h applied to that head's logits


def attention_modules(model: torch.nn.Module) -> list[tuple[str, StableAttention]]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, StableAttention)]
    if not found:
        raise ValueError(f"model: {type(model).__name__} has no StableAttention module to record or clip")
    return found


@contextlib.contextmanager
def record_max_logits(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record each attention module's per-head max raw logit over the forwards run inside.

    Yields a dict filled on exit: module name -> (H,) fp32 (modules no forward reached are left
    out). Nests: an inner recording (e.g. a diagnostics probe) leaves an outer one's values alone.
    """
    modules = attention_modules(model)
    saved = [(m.record_max_logit, m.max_logit) for _, m in modules]
    for _, m in modules:
        m.record_max_logit, m.max_logit = True, None
    out: dict[str, torch.Tensor] = {}
    try:
        yield out
    finally:
        for (name, m), (flag, value) in zip(modules, saved):
            if m.max_logit is not None:
                out[name] = m.max_logit.detach()
            m.record_max_logit, m.max_logit = flag, value


def _check_tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < math.inf:
        raise ValueError(f"tau: expected a positive finite float, got {tau!r}")
    return float(tau)


def _mul_(p: torch.Tensor | None, factor: torch.Tensor) -> None:
    """p *= factor (broadcast over p), in p's dtype; a sharded (FSDP2) p is scaled shard by shard."""
    if p is None:
        return
    factor = factor.to(device=p.device, dtype=p.dtype).expand(p.shape)
    if isinstance(p, DTensor):
        # Every rank holds the same factor (S was MAX-reduced), so each keeps its own slice.
        factor = distribute_tensor(factor.contiguous(), p.device_mesh, p.placements, src_data_rank=None)
    p.mul_(factor)


def _rescale(m: StableAttention, gamma: torch.Tensor) -> None:
    """Scale head h's logits by gamma[h] (the shared norms: by min(gamma)) through q's and k's maps."""
    if m.q_norm is not None:
        f = gamma.min().sqrt()
        for norm in (m.q_norm, m.k_norm):
            _mul_(norm.weight, f)
            _mul_(norm.bias, f)
        return
    f = gamma.sqrt()
    ones = torch.ones_like(f)
    if m.low_rank is None:
        # c_attn's output rows: q's H heads of D, then k's, then v's.
        rows = torch.cat([f, f, ones]).repeat_interleave(m.head_dim)
        _mul_(m.c_attn.weight, rows[:, None])
        _mul_(m.c_attn.bias, rows)
    else:
        per_head = torch.stack([f, f, ones])  # (3, H): q, k, v
        _mul_(m.c_attn_up, per_head[:, :, None, None])
        _mul_(m.c_attn_up_bias, per_head[:, :, None])


@torch.no_grad()
def apply_qk_clip(model: torch.nn.Module, tau: float, max_logits: dict[str, torch.Tensor]) -> ClipResult:
    """Apply the rule after the optimizer step, from the step's recorded `max_logits` (see
    record_max_logits). Under torch.distributed every rank must call it: S is MAX-reduced over
    ranks first, so every replica applies the same factors."""
    tau = _check_tau(tau)
    modules = attention_modules(model)
    missing = [name for name, _ in modules if name not in max_logits]
    if missing:
        raise ValueError(f"max_logits: nothing recorded for {missing}; run the step's forward passes inside "
                         "record_max_logits(model) (or QKClip.recording())")
    device = next(p.device for p in modules[0][1].parameters())
    S = torch.stack([max_logits[name].to(device=device, dtype=torch.float32) for name, _ in modules])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(S, op=dist.ReduceOp.MAX)
    gamma = torch.where(S > tau, tau / S, torch.ones_like(S))
    for (_, m), g in zip(modules, gamma):
        if (g < 1).any():
            _rescale(m, g)
    names = [name for name, _ in modules]
    return ClipResult(dict(zip(names, S)), dict(zip(names, gamma)))


class QKClip:
    """Record the step's max logits (`recording()`, entered once per micro-batch or around all of
    them), then `apply()` after the optimizer step; see the module doc."""

    def __init__(self, model: torch.nn.Module, tau: float = 100.0):
        self.model = model
        self.tau = _check_tau(tau)
        attention_modules(model)
        self._max: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def recording(self):
        with record_max_logits(self.model) as got:
            yield
        for name, value in got.items():
            prev = self._max.get(name)
            self._max[name] = value if prev is None else torch.maximum(prev, value)

    def discard(self) -> None:
        """Forget what was recorded (a step whose update was skipped or rolled back)."""
        self._max = {}

    def apply(self) -> ClipResult:
        try:
            return apply_qk_clip(self.model, self.tau, self._max)
        finally:
            self._max = {}
