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


def unigram_loss() -> float:
    """Cross-entropy (nats per byte) of the bundled corpus's validation bytes under its training
    bytes' frequencies: what a model that ignores all context reaches."""
    import numpy as np

    corpus = data.load("bundled", "byte")
    counts = sum(np.bincount(s.tokens(), minlength=256) for s in corpus.train.shards).astype(np.float64) + 1.0
    val = sum(np.bincount(s.tokens(), minlength=256) for s in corpus.val.shards)
    return float(-(val * np.log(counts / counts.sum())).sum() / val.sum())


# A run at the unigram loss has stopped using context (its attention collapsed): "trains" asks
# for a clear margin below it.
MARGIN = 0.1


def loss_threshold() -> float:
    """The loss a run must end below to count as training: the unigram loss less MARGIN."""
    return unigram_loss() - MARGIN


def trained(record: dict, threshold: float) -> bool:
    """A run still trains: it finished (the training command's divergence rule did not stop it),
    no spike was flagged, and its final validation loss is finite and below `threshold`."""
    r = record["result"]
    return not r["diverged"] and r["spikes"] == 0 and math.isfinite(r["final_val_loss"]) and r["final_val_loss"] < threshold
