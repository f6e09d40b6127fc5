"""The stability benchmark's plots, each written whole or not at all."""

from __future__ import annotations

import math
from pathlib import Path

from stableblocks.checkpoint import atomic_write

from . import plan


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format=path.suffix[1:], dpi=120, bbox_inches="tight"))
    return path


def plot_all(scale: plan.Scale, runs, init: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import boundary_table, bracket_table, output_logit_table, seed_table

    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=plt.get_cmap("tab20").colors)
    paths = []

    # Loss vs lr: the bracket per variant, and for the seeded recipes mean ± std bands.
    fig, ax = plt.subplots(figsize=(8, 5))
    seeded = {r["variant"]: r for r in seed_table(scale, runs)}
    for t in bracket_table(scale, runs):
        lrs = [lr for lr, x in t["loss_by_lr"].items() if x is not None and math.isfinite(x)]
        line, = ax.plot(lrs, [t["loss_by_lr"][lr] for lr in lrs], marker="o", label=t["variant"], linewidth=1)
        if t["variant"] in seeded:
            per_lr = seeded[t["variant"]]["per_lr"]
            xs = list(per_lr)
            ax.fill_between(xs, [per_lr[x][0] - per_lr[x][1] for x in xs], [per_lr[x][0] + per_lr[x][1] for x in xs],
                            color=line.get_color(), alpha=0.2)
    ax.axhline(runs.threshold, color="grey", linestyle=":", label="threshold of \"trains\"")
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss",
           title=f"Loss vs learning rate (bands: mean ± std over {len(scale.seeds)} seeds)")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "loss_vs_lr.png"))

    # The failure boundary: from the largest lr that trains (dot) to the first that does not (cross).
    fig, ax = plt.subplots(figsize=(7, 4))
    bound = boundary_table(scale, runs)
    for i, (name, label) in enumerate((("clip", "grad clip 1.0"), ("noclip", "no clipping"))):
        color = f"C{2 * i}"
        ax.plot([], [], "o-", color=color, label=label)
        for j, r in enumerate(bound):
            y, (top, fail) = j + (0.15 if i else -0.15), r[name]
            if top and fail:
                ax.plot([top, fail], [y, y], color=color, linewidth=1)
            if top:
                ax.plot(top, y, "o", color=color)
            if fail:
                ax.plot(fail, y, "x", color=color)
    ax.set_yticks(range(len(bound)), [r["variant"] for r in bound])
    ax.set(xscale="log", xlabel="peak lr: largest that trains (o), first that does not (x)",
           title="Failure boundary (seed 0)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "largest_trainable_lr.png"))

    # Attention-logit growth at a high lr without clipping.
    fig, ax = plt.subplots(figsize=(8, 5))
    for v in scale.headline:
        r = runs.get(plan.spec(scale, v, 1e-1, grad_clip=0.0))
        if r and r["trace"]["attn_logit_max"]:
            ax.plot(*zip(*r["trace"]["attn_logit_max"]), label=v)
    ax.set(yscale="symlog", xlabel="step", ylabel="max raw attention logit (any layer)",
           title="Attention-logit growth at lr 0.1, no clipping")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "attn_logit_growth.png"))

    # Output logits without weight decay: max |logit| and log Z.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for row in output_logit_table(scale, runs):
        for ax, key in zip(axes, ("logit_absmax", "log_z")):
            if row["trace"][key]:
                ax.plot(*zip(*row["trace"][key]), label=row["arm"])
    axes[0].set(xlabel="step", ylabel="max |output logit|", title=f"Output logits (vanilla, lr {plan.OUTPUT_LOGIT_LR:g})")
    axes[1].set(xlabel="step", ylabel="log Z (mean log-sum-exp)", title="Log-partition drift")
    axes[0].legend(fontsize=7)
    paths.append(_save(fig, out / "output_logits.png"))

    # Gradient profile over depth at init.
    fig, ax = plt.subplots(figsize=(8, 5))
    for o in init:
        ax.plot(range(1, len(o["grad_norm"]) + 1), o["grad_norm"], marker=".", label=o["recipe"])
    ax.set(yscale="log", xlabel="layer", ylabel="gradient norm at init",
           title=f"Per-layer gradient norm at initialisation ({scale.init_layers} layers)")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "grad_norm_at_init.png"))
    plt.close("all")
    return paths
