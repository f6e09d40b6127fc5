"""stableblocks train: pre-train a StableGPT with a recipe and watch its stability diagnostics.

    stableblocks train                                   # tiny model, bundled corpus, CPU-friendly
    stableblocks train --recipe vanilla --lr 1e-2 --out-dir runs/vanilla
    stableblocks train --size gpt2-124m --data.source data/fineweb10B --data.tokenizer gpt2
    stableblocks train --config my.toml --steps 2000    # a config file (.toml/.json), then overrides
    stableblocks train --out-dir runs/vanilla --resume  # continue from runs/vanilla/ckpt.pt
    torchrun --nproc_per_node 2 -m stableblocks.train [--fsdp] ...

Exit status: 0 finished; 2 bad input, a corrupt file, an out-dir in use or a failed write (disk
full, no permission); 3 diverged; 130 interrupted (Ctrl-C).
From Python: `run(TrainConfig(...))` or `main(["--steps", "100"])`, both returning the summary.
"""

from __future__ import annotations

import sys

from . import distributed
from .trainer import Trainer, WarmupCosine
from .train_config import (SIZES, DataConfig, DivergeConfig, ModelOverrides, SpikeConfig, TrainConfig, load_config,
                           model_config, validate)
from .train_config import parse_args as _parse_args

__all__ = ["SIZES", "DataConfig", "DivergeConfig", "ModelOverrides", "SpikeConfig", "TrainConfig", "Trainer", "WarmupCosine",
           "load_config", "model_config", "parse_args", "run", "main", "command", "EXIT_BAD_INPUT", "EXIT_DIVERGED",
           "EXIT_INTERRUPTED"]

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


def parse_args(argv=None) -> TrainConfig:
    return _parse_args(argv, description=__doc__)


def run(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; returns the summary (also written to OUT_DIR/summary.json). A diverged
    run returns its summary with diverged=True; bad input raises ValueError naming it."""
    validate(cfg)
    d = distributed.setup(cfg.device, cfg.fsdp)
    try:
        summary = Trainer(cfg, d).fit()
        if d.main and cfg.progress:
            _print_summary(summary)
        return summary
    finally:
        d.close()


def _print_summary(s: dict) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    status = "DIVERGED" if s["diverged"] else "done"
    print(f"{status}: {s['recipe']}, {s['steps']} steps -> {s['run_dir']}")
    if s["diverged"]:
        print(f"  {s['diverged_reason']}; last good checkpoint: {s['last_good_checkpoint'] or 'none'}")
    print(f"  loss {fmt(s['first_loss'])} -> {fmt(s['final_loss'])}; best val loss {fmt(s['best_val_loss'])}")
    spikes = ", ".join(map(str, s["spike_steps"][:20])) + (" ..." if len(s["spike_steps"]) > 20 else "")
    print(f"  spikes: {s['spikes']}" + (f" at steps {spikes}" if s["spikes"] else "")
          + (f"; {len(s['skipped_steps'])} updates skipped" if s["skipped_steps"] else "")
          + (f"; {s['rollbacks']} rollbacks" if s["rollbacks"] else ""))
    print(f"  max grad norm {fmt(s['max_grad_norm'])}; max |attention logit| {fmt(s['max_attn_logit'])}; "
          f"{s['tokens_per_s'] or 0:.0f} tokens/s; diagnostics {100 * (s['diag_overhead'] or 0):.1f}% of step time")


def main(argv=None) -> dict:
    """Parse the command line and train; returns the summary (errors raise)."""
    return run(parse_args(argv))


def command(argv=None) -> None:
    """The command line's entry: one line and no traceback on an error (exit statuses above)."""
    try:
        summary = main(argv)
    except ValueError as e:  # bad options, config files, data, checkpoints or run folders
        print(f"stableblocks train: error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except OSError as e:  # disk full, no permission, read-only: every write is atomic, the last checkpoint stands
        print(f"stableblocks train: error: {e} (checkpoints are written atomically: the last one on disk is whole)",
              file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        print("stableblocks train: interrupted; the last checkpoint on disk is whole (--resume continues from it)",
              file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    raise SystemExit(EXIT_DIVERGED if summary["diverged"] else 0)


if __name__ == "__main__":
    command()
