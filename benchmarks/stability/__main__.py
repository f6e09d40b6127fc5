"""The stability benchmark: do the stabilisers work at a scale that runs on 2 CPU cores?

    python -m benchmarks.stability            # the full mode (committed results; ~30-60 min on 2 cores)
    python -m benchmarks.stability --quick    # about a minute: a tiny grid, end to end

1. Gradients at init (Spike No More): per-layer gradient norm and the residual stream's std
   entering each layer, for a deep narrow model under each recipe.
2. LR sensitivity (Wortsman et al.): every recipe trained over an lr grid on the bundled corpus;
   final validation loss, LR sensitivity, the largest lr that does not diverge (the training
   command's divergence rule, stableblocks.spikes.DivergenceRule), spikes, max grad
   norm and max attention logit per run.
3. Attention-logit growth: the max raw attention logit over training at a high lr, with and
   without QK-norm, read from the same runs' diagnostics.

Writes results.csv, results.md and PNG plots into --out (default benchmarks/stability/results).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..report import README, replace_block
from ..results import output_folder

COMMITTED = Path(__file__).parent / "results"

from .analysis import gradients_at_init, largest_stable_lr, lr_sensitivity

# label -> (recipe, StableConfig overrides). Every recipe of SPEC.md section 5 has a row; the
# combinations are candidates for `stable`; "vanilla+cap" checks that the cap alone does little.
VARIANTS: dict[str, tuple[str, dict]] = {
    "gpt2": ("gpt2", {}),
    "vanilla": ("vanilla", {}),
    "vanilla+cap": ("vanilla", {"softcap": 50.0}),
    "scaled-embed": ("scaled-embed", {}),
    "embed-ln": ("embed-ln", {}),
    "qk-norm": ("qk-norm", {}),
    "qk-norm-cap": ("qk-norm-cap", {}),
    "qkv-norm": ("qkv-norm", {}),
    "qk-fc-norm": ("qk-fc-norm", {}),
    "wesar": ("wesar", {}),
    "embed-ln+qk-norm-cap": ("qk-norm-cap", {"embed_ln": True}),
    "embed-ln+qkv-norm": ("qkv-norm", {"embed_ln": True}),
}


@dataclass
class Setup:
    variants: list[str]
    lrs: list[float]
    seeds: list[int]
    steps: int
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    seq_len: int = 128
    batch_size: int = 16
    init_layers: int = 24  # the gradients-at-init model: deep and narrow
    init_width: int = 256


FULL = Setup(variants=list(VARIANTS), lrs=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1], seeds=[0], steps=300, n_layer=4)
QUICK = Setup(variants=["vanilla", "embed-ln"], lrs=[3e-3, 1e-1], seeds=[0], steps=30, n_layer=2,
              n_embd=64, seq_len=64, batch_size=8, init_layers=6, init_width=64)


def _save(fig, path: Path) -> None:
    """Written whole or not at all: a crash mid-write leaves the previous plot."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)


def train_one(label: str, lr: float, seed: int, setup: Setup, out: Path) -> dict:
    """One training run through the training command's own loop; returns its summary row."""
    import torch

    torch.set_num_threads(1)  # two runs share the two cores
    from stableblocks.train import ModelOverrides, TrainConfig, run

    recipe, overrides = VARIANTS[label]
    cfg = TrainConfig(
        recipe=recipe, size="tiny", seq_len=setup.seq_len, batch_size=setup.batch_size,
        model=ModelOverrides(n_layer=setup.n_layer, n_head=setup.n_head, n_embd=setup.n_embd, **overrides),
        steps=setup.steps, lr=lr, warmup=max(1, setup.steps // 10), seed=seed,
        eval_interval=max(1, setup.steps // 4), diag_interval=max(1, setup.steps // 40), ckpt_interval=0,
        out_dir=str(out / "runs" / f"{label}_lr{lr:g}_s{seed}"), overwrite=True, plot=False, progress=False,
    )
    s = run(cfg)
    final = s["final_val_loss"] if not s["diverged"] and s["final_val_loss"] is not None else math.nan
    return {"variant": label, "recipe": recipe, "overrides": json.dumps(overrides), "lr": lr, "seed": seed,
            "steps": setup.steps, "final_val_loss": final, "first_loss": s["first_loss"], "diverged": s["diverged"],
            "spikes": s["spikes"], "max_grad_norm": s["max_grad_norm"], "max_attn_logit": s["max_attn_logit"],
            "run_dir": s["run_dir"]}


def sweep(setup: Setup, out: Path, workers: int) -> list[dict]:
    jobs = [(v, lr, seed) for v in setup.variants for lr in setup.lrs for seed in setup.seeds]
    rows = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(train_one, v, lr, seed, setup, out) for v, lr, seed in jobs]
        for f in tqdm(as_completed(futures), total=len(futures), desc="stability runs"):
            rows.append(f.result())
    order = {(v, lr, s): i for i, (v, lr, s) in enumerate(jobs)}
    return sorted(rows, key=lambda r: order[(r["variant"], r["lr"], r["seed"])])


def summarise(rows: list[dict], setup: Setup) -> list[dict]:
    """Per variant: loss per lr (mean over seeds), best loss and lr, LR sensitivity, stability."""
    loss_init = math.log(256)  # a uniform guess over bytes
    table = []
    for v in setup.variants:
        mine = [r for r in rows if r["variant"] == v]
        per_lr = {}
        for lr in setup.lrs:
            vals = [r["final_val_loss"] for r in mine if r["lr"] == lr]
            per_lr[lr] = math.nan if any(math.isnan(x) for x in vals) else sum(vals) / len(vals)
        finite = {lr: x for lr, x in per_lr.items() if math.isfinite(x)}
        best_lr = min(finite, key=finite.get) if finite else None
        table.append({
            "variant": v, "loss_by_lr": per_lr, "best_loss": finite.get(best_lr, math.nan), "best_lr": best_lr,
            "largest_stable_lr": largest_stable_lr(per_lr), "lr_sensitivity": lr_sensitivity(per_lr, loss_init),
            "spikes": sum(r["spikes"] for r in mine), "diverged_runs": sum(bool(r["diverged"]) for r in mine),
            "max_grad_norm": max(r["max_grad_norm"] for r in mine),
            "max_attn_logit": max((r["max_attn_logit"] or 0.0) for r in mine),
        })
    return table


def sweep_markdown(table: list[dict], setup: Setup) -> str:
    """The setup line and the learning-rate table: results.md's first part and the README's block."""
    fmt = lambda x: "diverged" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"  # noqa: E731
    lines = [
        f"Model: {setup.n_layer} layers, {setup.n_embd} wide, {setup.n_head} heads, byte-level, context {setup.seq_len}, "
        f"batch {setup.batch_size}; {setup.steps} steps of AdamW (warmup 10%, cosine to 0.1x), grad clip 1.0, "
        f"seeds {setup.seeds}; bundled corpus. Loss = final validation loss (nats per byte).",
        "",
        "| variant | " + " | ".join(f"lr {lr:g}" for lr in setup.lrs) + " | best | LR sensitivity | largest stable lr | spikes | max grad norm | max attn logit |",
        "|---|" + "---|" * (len(setup.lrs) + 6),
    ]
    for t in table:
        cells = [fmt(t["loss_by_lr"][lr]) for lr in setup.lrs]
        lines.append(f"| {t['variant']} | " + " | ".join(cells) + f" | {fmt(t['best_loss'])} | {t['lr_sensitivity']:.3f} | "
                     f"{t['largest_stable_lr'] if t['largest_stable_lr'] else '-'} | {t['spikes']} | {t['max_grad_norm']:.2f} | {t['max_attn_logit']:.1f} |")
    return "\n".join(lines)


def write_markdown(table: list[dict], init: list[dict], setup: Setup, path: Path) -> None:
    lines = [sweep_markdown(table, setup)]
    lines += ["", f"Gradients at init ({setup.init_layers} layers, {setup.init_width} wide): first / last layer gradient norm, "
              "and the std of the residual stream entering layer 1.", "",
              "| recipe | grad first / last | std into layer 1 |", "|---|---|---|"]
    for o in init:
        lines.append(f"| {o['recipe']} | {o['grad_norm'][0] / o['grad_norm'][-1]:.2f} | {o['residual_std'][0]:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(table: list[dict], rows: list[dict], init: list[dict], setup: Setup, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=plt.get_cmap("tab20").colors)  # 12 variants, 12 colours
    paths = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for t in table:
        lrs = [lr for lr in setup.lrs if math.isfinite(t["loss_by_lr"][lr])]
        ax.plot(lrs, [t["loss_by_lr"][lr] for lr in lrs], marker="o", label=t["variant"])
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss", title="Loss vs learning rate (missing = diverged)")
    ax.legend(fontsize=7)
    paths.append(out / "loss_vs_lr.png")
    _save(fig, paths[-1])

    def trace(row, key):
        steps, vals = [], []
        for line in open(Path(row["run_dir"]) / "metrics.jsonl"):
            r = json.loads(line)
            if key in r and r[key] is not None:
                v = r[key]
                steps.append(r["step"])
                vals.append(max(v) if isinstance(v, list) else v)
        return steps, vals

    fig, ax = plt.subplots(figsize=(8, 5))
    for t in table:
        lr = t["largest_stable_lr"] or setup.lrs[0]
        row = next(r for r in rows if r["variant"] == t["variant"] and r["lr"] == lr)
        ax.plot(*trace(row, "grad_norm"), label=f"{t['variant']} (lr {lr:g})", linewidth=0.8)
    ax.set(yscale="log", xlabel="step", ylabel="gradient norm", title="Gradient norm at each variant's highest stable lr")
    ax.legend(fontsize=7)
    paths.append(out / "grad_norm_traces.png")
    _save(fig, paths[-1])

    fig, ax = plt.subplots(figsize=(8, 5))
    for o in init:
        ax.plot(range(1, len(o["grad_norm"]) + 1), o["grad_norm"], marker=".", label=o["recipe"])
    ax.set(yscale="log", xlabel="layer", ylabel="gradient norm at init", title="Per-layer gradient norm at initialisation")
    ax.legend(fontsize=7)
    paths.append(out / "grad_norm_at_init.png")
    _save(fig, paths[-1])

    fig, ax = plt.subplots(figsize=(8, 5))
    high = max(setup.lrs)
    for v in [v for v in ("vanilla", "qk-norm", "qk-norm-cap", "qkv-norm") if v in setup.variants]:
        row = next(r for r in rows if r["variant"] == v and r["lr"] == high)
        ax.plot(*trace(row, "attn_logit_max"), label=v)
    ax.set(yscale="log", xlabel="step", ylabel="max |raw attention logit| (any layer)", title=f"Attention-logit growth at lr {high:g}")
    ax.legend(fontsize=7)
    paths.append(out / "attn_logit_growth.png")
    _save(fig, paths[-1])
    plt.close("all")
    return paths


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stability", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny grid, end to end (about a minute on 2 idle cores)")
    p.add_argument("--out", type=Path, help="results folder (default: the committed benchmarks/stability/results for "
                   "a full run, runs/benchmarks/stability-quick for --quick)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="runs trained at once")
    args = p.parse_args(argv)
    args.out = output_folder(p, COMMITTED, args.out, args.quick, "stability-quick")
    setup = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    init_recipes = [v for v in setup.variants if not VARIANTS[v][1]]
    init = [gradients_at_init(r, setup.init_layers, setup.init_width, setup.n_head) for r in tqdm(init_recipes, desc="gradients at init")]
    rows = sweep(setup, args.out, args.workers)
    table = summarise(rows, setup)
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (args.out / "init.json").write_text(json.dumps(init, indent=1) + "\n")
    write_markdown(table, init, setup, args.out / "results.md")
    if args.out.resolve() == COMMITTED.resolve():  # a full run into the committed results: the README follows
        replace_block(README, "stability", "\n" + sweep_markdown(table, setup) + "\n")
    plots = plot(table, rows, init, setup, args.out)
    print((args.out / "results.md").read_text())
    return {"rows": rows, "table": table, "init": init, "plots": plots}


if __name__ == "__main__":
    main()
