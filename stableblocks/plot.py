"""stableblocks plot RUN_DIR [RUN_DIR ...]: the stability diagnostics of runs, overlaid, as PNGs.

One PNG per diagnostic, every run a line labelled with its recipe: loss.png (train and val
loss), grad_norm.png (log scale), tev.png (Token Embedding Variability), attn_logit.png (the
signed max raw attention logit, block 0 and the max over blocks) and output_norms.png (QKV, Proj and FC2
output norms, max over blocks). Written into --out (default: the run folder for one run,
./plots for several).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def _save(fig, path: Path) -> None:
    """Written whole or not at all: a crash mid-write leaves the previous plot."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)


def read_run(run_dir: str | Path) -> tuple[str, list[dict]]:
    """(label, metric rows) of a run folder written by `stableblocks train`."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"RUN_DIR: {run_dir} has no metrics.jsonl (is it a `stableblocks train` output folder?)")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    config = run_dir / "config.json"
    label = json.loads(config.read_text()).get("recipe", run_dir.name) if config.is_file() else run_dir.name
    return label, rows


def _series(rows: list[dict], key, reduce=None) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key) if isinstance(key, str) else key(r)
        if v is None:
            continue
        if reduce is not None:
            v = reduce(v)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def plot_runs(run_dirs, out_dir: str | Path | None = None) -> list[Path]:
    """Write the PNGs for `run_dirs` into `out_dir`; returns their paths."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or state touched

    runs = [read_run(r) for r in run_dirs]
    if not runs:
        raise ValueError("RUN_DIR: give at least one run folder")
    labels = [label for label, _ in runs]
    runs = [(f"{label} ({Path(r).name})" if labels.count(label) > 1 else label, rows) for (label, rows), r in zip(runs, run_dirs)]
    out = Path(out_dir) if out_dir is not None else (Path(run_dirs[0]) if len(runs) == 1 else Path("plots"))
    out.mkdir(parents=True, exist_ok=True)

    def figure(name: str, panels: list[tuple[str, object, object, bool]]) -> Path:
        """panels: (title, key or row -> value, reducer of a per-layer list, log y)."""
        fig = Figure(figsize=(5.5 * len(panels), 4), layout="constrained")
        for i, (title, key, reduce, log_y) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            for j, (label, rows) in enumerate(runs):
                xs, ys = _series(rows, key, reduce)
                if xs:
                    ax.plot(xs, ys, label=label, color=f"C{j}", lw=1)
            ax.set_title(title)
            ax.set_xlabel("step")
            if log_y:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        path = out / f"{name}.png"
        _save(fig, path)
        return path

    paths = []
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for j, (label, rows) in enumerate(runs):
        ax.plot(*_series(rows, "loss"), color=f"C{j}", lw=0.8, alpha=0.6, label=f"{label} train")
        xs, ys = _series(rows, "val_loss")
        ax.plot(xs, ys, color=f"C{j}", marker="o", ms=3, lw=1.5, label=f"{label} val")
    ax.set(title="loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(out / "loss.png")
    _save(fig, paths[-1])

    paths.append(figure("grad_norm", [("global gradient norm", "grad_norm", None, True)]))
    paths.append(figure("tev", [("TEV: mean over tokens of std of embedding row", "tev_mean", None, False),
                                ("std over tokens of std of embedding row", "tev_std", None, False)]))
    paths.append(figure("attn_logit", [("max raw attention logit (signed), block 0", "attn_logit_max", lambda v: v[0], True),
                                       ("max raw attention logit (signed), all blocks", "attn_logit_max", max, True)]))
    paths.append(figure("output_norms", [(f"{name} output L2 norm (max over blocks)", key, max, True)
                                         for name, key in (("QKV", "qkv_out_norm"), ("Proj", "proj_out_norm"), ("FC2", "fc2_out_norm"))]))
    return paths


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(prog="stableblocks plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders written by `stableblocks train`")
    p.add_argument("--out", default=None, help="where the PNGs go (default: the run folder, or ./plots for several runs)")
    args = p.parse_args(argv)
    paths = plot_runs(args.run_dirs, args.out)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
