"""Measurements behind the stability benchmark: gradients at init, LR sensitivity, divergence."""

from __future__ import annotations

import math

import torch

import stableblocks as sb
from stableblocks import data


def lr_sensitivity(final_losses: dict[float, float], loss_init: float) -> float:
    """Wortsman et al.'s LR sensitivity: mean over the lr grid of min(loss(lr), loss_init) minus
    the best loss over the grid. A diverged run (nan/inf) counts as loss_init."""
    clipped = [min(v, loss_init) if math.isfinite(v) else loss_init for v in final_losses.values()]
    return sum(clipped) / len(clipped) - min(clipped)


def largest_stable_lr(final_losses: dict[float, float]) -> float | None:
    """The largest lr whose runs did not diverge (None if all did). A diverged run's loss is nan:
    the training command decided it with its divergence rule (stableblocks.spikes.DivergenceRule)."""
    ok = [lr for lr, v in final_losses.items() if math.isfinite(v)]
    return max(ok) if ok else None


def gradients_at_init(recipe: str, n_layer: int, n_embd: int, n_head: int, block_size: int = 128,
                      batch_size: int = 8, seed: int = 0) -> dict:
    """Per-layer gradient norm and the std of the residual stream entering each layer, at init,
    on one batch of the bundled corpus (Spike No More's analysis)."""
    torch.manual_seed(seed)
    cfg = sb.recipe(recipe, vocab_size=256, n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=block_size)
    model = sb.StableGPT(cfg)
    x, y = data.load("bundled", "byte").train.sample(batch_size, block_size, torch.Generator().manual_seed(seed))
    stds = []
    hooks = [b.register_forward_pre_hook(lambda m, args: stds.append(args[0].detach().float().std().item())) for b in model.blocks]
    _, loss = model(x, y)
    loss.backward()
    for h in hooks:
        h.remove()
    grad_norms = [torch.sqrt(sum(p.grad.float().pow(2).sum() for p in b.parameters() if p.grad is not None)).item() for b in model.blocks]
    return {"recipe": recipe, "loss": loss.item(), "grad_norm": grad_norms, "residual_std": stds}
