"""The stability benchmark: where does each recipe break, and which one should `stable` be?

    python -m benchmarks.stability                  # the full mode (~1.5 h on 2 idle cores; resumable)
    python -m benchmarks.stability --budget 30      # train for at most 30 more minutes, then stop
    python -m benchmarks.stability --quick          # about 10 s: every arm on a tiny model

Every run goes through the training command's own loop (stableblocks.train.run) and is stored
under the hash of its spec in runs.jsonl (store.py): a rerun trains only what is missing or
changed, so the full mode can be completed in parts. The arms (plan.py): an lr bracket per
variant, the failure boundary with and without gradient clipping, seeds for the headline
recipes, a 12-layer arm, output-logit divergence without weight decay, and ablations of the
embedding fixes. Once every run of the plan is stored it writes results.csv, results.md and the
plots into --out (default benchmarks/stability/results), and for the committed results the
README's table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path
from time import monotonic

from tqdm import tqdm

from ..results import output_folder, versions
from . import plan
from .analysis import loss_threshold, trained
from .store import Store, StoreError

COMMITTED = Path(__file__).parent / "results"
TRACE_KEYS = ("loss", "grad_norm", "val_loss", "attn_logit_max", "logit_absmax", "log_z")


def train_one(spec: plan.RunSpec, out: Path) -> dict:
    """One training run through the training command's own loop -> its store record."""
    import torch

    torch.set_num_threads(1)  # runs share the cores, one each
    from stableblocks.train import DataConfig, ModelOverrides, TrainConfig, run

    steps = spec.steps
    cfg = TrainConfig(
        recipe=spec.recipe, size="tiny", seq_len=spec.seq_len, batch_size=spec.batch_size,
        model=ModelOverrides(n_layer=spec.n_layer, n_head=spec.n_head, n_embd=spec.n_embd, **spec.overrides()),
        data=DataConfig(tokenizer=spec.tokenizer, bpe_vocab_size=spec.bpe_vocab_size),
        steps=steps, lr=spec.lr, warmup=max(1, steps // 10), seed=spec.seed, grad_clip=spec.grad_clip,
        weight_decay=spec.weight_decay, eval_interval=max(1, steps // 4), diag_interval=max(1, steps // 40),
        ckpt_interval=0, out_dir=str(out / "runs" / spec.name()), overwrite=True, plot=False, progress=False,
    )
    s = run(cfg)
    final = s["final_val_loss"] if not s["diverged"] and s["final_val_loss"] is not None else float("nan")
    result = {"final_val_loss": final, "best_val_loss": s["best_val_loss"], "first_loss": s["first_loss"],
              "diverged": s["diverged"], "diverged_reason": s["diverged_reason"], "steps": s["steps"],
              "spikes": s["spikes"], "max_grad_norm": s["max_grad_norm"], "max_attn_logit": s["max_attn_logit"],
              "tokens_per_s": s["tokens_per_s"]}
    return {"key": spec.key(), "spec": asdict(spec), "config": spec.config(), "result": result,
            "trace": _trace(Path(s["run_dir"]) / "metrics.jsonl", max(1, steps // 40)), "versions": versions()}


def _trace(path: Path, every: int) -> dict:
    """{metric: [[step, value], ...]} at every diagnostics step (and every validation): the curves
    the plots draw, small enough to commit. A per-layer metric keeps its largest layer."""
    out = {k: [] for k in TRACE_KEYS}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        for k in TRACE_KEYS:
            v = row.get(k)
            if v is None or (k in ("loss", "grad_norm") and row["step"] % every):
                continue
            out[k].append([row["step"], max(v) if isinstance(v, list) else v])
    return out


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group: the parent alone handles it, and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Shut the pool down without waiting: the runs under way are killed, not finished."""
    if hasattr(pool, "terminate_workers"):  # Python >= 3.14
        pool.terminate_workers()
        return
    for proc in list((pool._processes or {}).values()):
        proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)


def train_plan(scale: plan.Scale, store: Store, out: Path, workers: int, budget_s: float | None, verdict,
               train=train_one) -> bool:
    """Train what the plan still needs, `workers` runs at a time, storing each as it ends; True once
    nothing is missing. Past the budget no run starts; the ones under way finish and are stored. A
    run that raises, or whose worker dies, is reported and skipped (a rerun tries it again); an
    interrupt kills the runs under way and stops at once."""
    deadline = None if budget_s is None else monotonic() + budget_s
    running: dict = {}  # future -> spec
    failed: set[str] = set()
    bar = tqdm(desc="stability runs", unit="run", dynamic_ncols=True)
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_worker_init)
    try:
        while True:  # the adaptive arms re-plan after every run
            specs = plan.plan(scale, store.records, verdict)
            busy = {s.key() for s in running.values()}
            pending = [s for s in specs if s.key() not in store and s.key() not in failed and s.key() not in busy]
            bar.total, bar.n = len(specs), sum(s.key() in store for s in specs)
            bar.refresh()
            while pending and len(running) < workers and (deadline is None or monotonic() < deadline):
                try:
                    running[pool.submit(train, pending[0], out)] = pending[0]
                except BrokenProcessPool:
                    break  # a worker died since the last wait: its run fails below, a fresh pool follows
                pending.pop(0)
            if not running:
                pool.shutdown()
                return not pending and not failed
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = False
            for f in done:
                s = running.pop(f)
                try:
                    record = f.result()
                    if record.get("key") != s.key():
                        raise ValueError(f"its record's key {record.get('key')!r} is not the spec's {s.key()!r}")
                except Exception as exc:  # noqa: BLE001 - one broken run must not cost the others
                    # A worker that died (killed for memory, a crash) breaks the pool: every run
                    # then in flight fails with it, and a fresh pool takes the rest.
                    broken |= isinstance(exc, BrokenProcessPool)
                    failed.add(s.key())
                    tqdm.write(f"stability: run {s.name()} failed and is not stored: {type(exc).__name__}: {exc}",
                               file=sys.stderr)
                    continue
                store.add(record)
            if broken:
                for f, s in running.items():
                    failed.add(s.key())
                    tqdm.write(f"stability: run {s.name()} was lost with its pool and is not stored", file=sys.stderr)
                running.clear()
                _stop(pool)
                pool = ProcessPoolExecutor(max_workers=workers, initializer=_worker_init)
    except BaseException:
        _stop(pool)
        raise
    finally:
        bar.close()


def main(argv=None) -> dict:
    from stableblocks.rundir import RunDirError, RunLock
    from stableblocks.train import EXIT_INTERRUPTED

    p = argparse.ArgumentParser(prog="python -m benchmarks.stability", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every arm on a tiny model (about 10 s on 2 idle cores)")
    p.add_argument("--out", type=Path, help="results folder (default: the committed benchmarks/stability/results for "
                   "the full mode, runs/benchmarks/stability-quick for --quick)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="runs trained at once")
    p.add_argument("--budget", type=float, metavar="MINUTES",
                   help="start no run after this many minutes; a rerun continues where this one stopped")
    args = p.parse_args(argv)
    if args.workers < 1 or (args.budget is not None and args.budget < 0):
        p.error("--workers: expected >= 1; --budget: expected >= 0 minutes")
    args.out = output_folder(p, COMMITTED, args.out, args.quick, "stability-quick")
    scale = plan.QUICK if args.quick else plan.FULL
    lock = RunLock(args.out)
    try:
        lock.acquire()
    except RunDirError as exc:
        print(f"stability: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        try:
            store = Store(args.out)
        except StoreError as exc:
            print(f"stability: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        threshold = loss_threshold()
        verdict = lambda record: trained(record, threshold)  # noqa: E731
        try:
            complete = train_plan(scale, store, args.out, args.workers,
                                  None if args.budget is None else 60 * args.budget, verdict)
        except KeyboardInterrupt:
            print(f"\nstability: interrupted; {len(store.records)} runs stored in {store.path}; run the same command "
                  "again to continue", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None
        if not complete:
            todo = len([s for s in plan.plan(scale, store.records, verdict) if s.key() not in store])
            print(f"stability: {len(store.records)} runs stored in {store.path}, at least {todo} to go; "
                  "run the same command again to continue (results are written once every run is stored)")
            return {"complete": False, "records": store.records}
        from . import report

        return {"complete": True, "records": store.records,
                **report.write(scale, store.records, threshold, args.out, committed=args.out.resolve() == COMMITTED.resolve())}
    finally:
        lock.release()


if __name__ == "__main__":
    main()
