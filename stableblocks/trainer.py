"""The training loop as an object: its state is attributes, its steps are named methods.

    Trainer(cfg, dist).fit()  ->  summary

One optimizer step is `step` (forward, backward, clip, diagnostics), then `guard` (spike
detection, the divergence rule: update, skip, roll back or stop), then `update`. A checkpoint of
the state at step s is taken at the start of step s and written only once step s has shown the
state to be good (see `save`), so the file on disk is always the last good state.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint, data, diagnostics, distributed, rundir
from .distributed import Dist
from .model import StableGPT
from .qk_clip import QKClip
from .spikes import DivergenceRule, SpikeDetector
from .train_config import TrainConfig, model_config, resume_changes


class WarmupCosine:
    """LR factor: linear warmup to 1 over `warmup` steps, cosine decay to `min_ratio` at `steps`."""

    def __init__(self, warmup: int, steps: int, min_ratio: float):
        self.warmup, self.steps, self.min_ratio = warmup, steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _autocast(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16":
        return precision, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return precision, contextlib.nullcontext


class Trainer:
    def __init__(self, cfg: TrainConfig, d: Dist):
        """Takes OUT_DIR's lock (rank 0) until `fit` returns, or at once if set-up fails: one run
        per folder, and a folder holding a run is continued only with resume, replaced only with
        overwrite."""
        self.cfg, self.d = cfg, d
        self.out = Path(cfg.out_dir)
        self.lock = rundir.RunLock(self.out)
        if d.main:
            self.lock.acquire()
        try:
            if d.main:
                rundir.check_reuse(self.out, cfg.resume, cfg.overwrite)
            self._setup()
        except BaseException:
            self.lock.release()
            raise

    def _setup(self) -> None:
        cfg, d = self.cfg, self.d
        self.ckpt_path = self.out / checkpoint.FILE
        resumed = checkpoint.load(self.ckpt_path) if cfg.resume else None
        self.corpus = self._load_data()
        self.mcfg = model_config(cfg, self.corpus.vocab_size)
        self.seq_len = self.mcfg.block_size
        data.check_fits(self.corpus, self.seq_len)
        if cfg.batch_size % d.world:
            raise ValueError(f"batch_size: {cfg.batch_size} sequences do not split over {d.world} processes")
        local = cfg.batch_size // d.world
        self.rows = slice(d.rank * local, (d.rank + 1) * local)
        self.changes = self._resume_changes(resumed) if resumed is not None else None
        self._build()
        self.step_no = 0
        self.last_good: int | None = None  # the step of the checkpoint on disk (always a good state)
        self.clean = True  # the last applied update was an unflagged step
        self.rolled_back_to: int | None = None
        self.final_val_ok = True
        if resumed is not None:
            self.restore(resumed, everything=True)
            self.step_no = self.last_good = resumed["step"]
        self._open_run_dir(resumed is not None)

    # ------------------------------------------------------------ set-up

    def _load_data(self) -> data.Corpus:
        """Rank 0 tokenizes (and caches) first; the others then read the cache."""
        c = self.cfg.data
        load = lambda: data.load(c.source, c.tokenizer, val_fraction=c.val_fraction, cache_dir=c.cache_dir,  # noqa: E731
                                 bpe_vocab_size=c.bpe_vocab_size)
        corpus = load() if self.d.main else None
        self.d.barrier()
        return corpus or load()

    def _resume_changes(self, state: dict) -> dict:
        stream, other = resume_changes(state["config"], self.cfg, state["model_config"], self.mcfg)
        if stream and not self.cfg.allow_changes:
            said = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in stream.items())
            raise ValueError(f"resume: {said}: these change the data stream or the model; pass the run's settings "
                             f"(see {self.out / 'config.json'}) or --allow-changes")
        return {**stream, **other}

    def _build(self) -> None:
        cfg, d = self.cfg, self.d
        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        model = StableGPT(self.mcfg).to(d.device)
        self.n_params = model.num_params()
        self.net, self.core = distributed.wrap(model, d, cfg.fsdp, cfg.compile)
        self.opt = self.core.configure_optimizers(cfg.weight_decay, cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        # This run's settings per group: loading an optimizer state brings the saved run's back.
        self.hparams = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        self.schedule = WarmupCosine(cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        self.precision, self.autocast = _autocast(cfg.precision, d.device)
        torch.manual_seed(cfg.seed + d.rank)  # dropout streams differ across processes
        self.gen = torch.Generator().manual_seed(cfg.seed)  # the data position: batches are random windows
        s = cfg.spike
        self.detectors = {name: SpikeDetector(s.window, s.k, s.min_history) for name in ("loss", "grad_norm")}
        self.watched = ("loss", "grad_norm") if s.metric == "both" else (s.metric,)
        self.rule = DivergenceRule(self.corpus.vocab_size, cfg.diverge.margin, cfg.diverge.patience, cfg.diverge.max_skipped)
        self.stats = {"first_loss": None, "final_loss": None, "best_val_loss": None, "val_loss": None, "spike_steps": [],
                      "skipped_steps": [], "rollbacks": 0, "max_grad_norm": 0.0, "max_attn_logit": None, "tokens": 0,
                      "train_time": 0.0, "diag_time": 0.0}
        self.ratio = diagnostics.UpdateRatio(self.core)
        # QK-clip: the step's per-head max logits, recorded over its micro-batches, rescale q/k after the update.
        self.clip = None if self.mcfg.qk_clip is None else QKClip(self.core, self.mcfg.qk_clip)

    def _open_run_dir(self, resumed: bool) -> None:
        """Every check has passed: now the folder may change (rank 0 writes, holding the lock).
        The metrics log, the last check (a damaged metrics.jsonl), comes before the run's records."""
        if self.d.main:
            if self.cfg.overwrite:
                rundir.clear(self.out)
            for p in checkpoint.remove_stale_temps(self.out):
                print(f"removed {p}, left by a killed write", file=sys.stderr)
        self.log = rundir.MetricsLog(self.out / rundir.METRICS, self.step_no if resumed else None, self.d.main)
        if self.d.main:
            self._write_run_info(resumed)

    def _write_run_info(self, resumed: bool) -> None:
        cfg, d = self.cfg, self.d
        info = {"config": asdict(cfg), "model_config": asdict(self.mcfg), "params": self.n_params, "world_size": d.world,
                "device": str(d.device), "precision": self.precision, "tokenizer": getattr(self.corpus.tokenizer, "name", None),
                "train_tokens": len(self.corpus.train), "val_tokens": len(self.corpus.val), "resumes": []}
        if resumed:
            try:
                info["resumes"] = json.loads((self.out / "run.json").read_text()).get("resumes", [])
            except (OSError, ValueError, AttributeError):
                pass
            info["resumes"].append({"step": self.step_no, "changes": self.changes})
        rundir.write_json(self.out / "config.json", asdict(cfg))
        rundir.write_json(self.out / "run.json", info)

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Everything the run needs to continue from here (every process must call it)."""
        model_state, optim_state = checkpoint.training_state(self.core, self.opt)
        return {"step": self.step_no, "model": model_state, "optimizer": optim_state, "data": self.gen.get_state(),
                "rng": checkpoint.gather_rng_states(), "spikes": {k: v.state_dict() for k, v in self.detectors.items()},
                "divergence": self.rule.state_dict(), "stats": copy.deepcopy(self.stats), "config": asdict(self.cfg),
                "model_config": asdict(self.mcfg), "world_size": self.d.world}

    def restore(self, state: dict, everything: bool) -> None:
        """The weights and optimizer of `state`; with `everything`, also the data position, RNGs,
        spike detectors, divergence rule and statistics (a resume; a rollback keeps those)."""
        try:
            checkpoint.load_training_state(self.core, self.opt, state["model"], state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise ValueError(f"resume: the weights in {self.ckpt_path} do not fit this model ({str(e).splitlines()[0]})") from None
        for group, hparams in zip(self.opt.param_groups, self.hparams):
            group.update(hparams)  # a resume's --weight-decay, --beta1/2, --eps take effect
        if everything:
            self.gen.set_state(state["data"])
            if len(state["rng"]) == self.d.world:
                checkpoint.set_rng_state(state["rng"][self.d.rank])
            for name, det in self.detectors.items():
                det.load_state_dict(state["spikes"][name])
            self.rule.load_state_dict(state["divergence"])
            self.stats.update(state["stats"])

    def save(self, state: dict | None, good: bool) -> None:
        """Write `state` as the checkpoint if it is good: the steps before and on it were finite,
        unflagged and under the divergence threshold (`good`), and its weights and optimizer
        state are finite. Anything else leaves the last good checkpoint in place."""
        d = self.d
        ok = distributed.any_true(d.main and good and checkpoint.all_finite([state["model"], state["optimizer"]]), d)
        if not ok:
            return
        if d.main:
            checkpoint.save(state, self.ckpt_path)
        self.last_good = state["step"]
        d.barrier()  # the file is whole before anyone may read it back

    def _checkpoint_due(self) -> bool:
        s, every = self.step_no, self.cfg.ckpt_interval
        return bool(every) and s > 0 and s % every == 0 and s != self.last_good

    # ------------------------------------------------------------ one step

    def step(self) -> dict:
        """Forward and backward over the micro-steps, the gradient norm (clipped), diagnostics;
        the update is `update`'s."""
        cfg, d = self.cfg, self.d
        self.t0 = time.perf_counter()
        lr = cfg.lr * self.schedule(self.step_no)
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=d.device)
        if self.clip is not None:
            self.clip.discard()  # a skipped or rolled-back step's record does not carry over
        recording = contextlib.nullcontext if self.clip is None else self.clip.recording
        for micro in range(cfg.grad_accum):
            x, y = self.corpus.train.sample(cfg.batch_size, self.seq_len, self.gen, self.rows)
            with distributed.grad_sync(self.net, self.core, cfg.fsdp, micro == cfg.grad_accum - 1), self.autocast(), recording():
                _, loss = self.net(x.to(d.device), y.to(d.device))
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        loss_value = d.mean(loss_sum / cfg.grad_accum).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.core.parameters(), cfg.grad_clip or float("inf"))
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        row = {"step": self.step_no, "loss": loss_value, "lr": lr, "grad_norm": grad_norm}
        self.diag = cfg.diag_interval > 0 and self.step_no % cfg.diag_interval == 0
        t = time.perf_counter()
        if self.diag:
            row["grad_norm_layers"] = diagnostics.grad_norms(self.core)
            probe_x, _ = self.corpus.train.sample(1, self.seq_len, torch.Generator().manual_seed(cfg.seed + 2 + self.step_no))
            row.update(diagnostics.probe(self.core, probe_x.to(d.device), self.autocast))
            if cfg.fsdp:
                distributed.reshard(self.core)
            self.ratio.snapshot()
        self.t_diag = time.perf_counter() - t
        return row

    def guard(self, row: dict) -> tuple[str, bool]:
        """(what to do with this step: "update", "skip", "rollback" or "stop"; whether it is a spike)."""
        cfg, loss, grad_norm = self.cfg, row["loss"], row["grad_norm"]
        tripped = [name for name, value in (("loss", loss), ("grad_norm", grad_norm)) if self.detectors[name].update(value)]
        if tripped:
            row["spike_on"] = tripped
        # A non-finite gradient poisons the weights even when the loss was finite.
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        spike = not finite or any(name in self.watched for name in tripped)
        if spike:
            self.stats["spike_steps"].append(self.step_no)
        action = "update"
        if spike and cfg.spike.guard != "off":
            # PaLM's remedy, once per checkpoint: a spike that comes back is skipped instead.
            rollback = (cfg.spike.guard == "rollback" and self.last_good is not None and self.last_good < self.step_no
                        and self.rolled_back_to != self.last_good)
            action = "rollback" if rollback else "skip"
        if self.rule.train_step(self.step_no, loss, finite, guarded=action != "update"):
            row["diverged"] = self.rule.reason
            action = "stop"
        return action, spike

    def rollback(self, row: dict) -> None:
        """Back to the last good checkpoint, then past the batches around the spike."""
        cfg = self.cfg
        state = checkpoint.load(self.ckpt_path)
        self.opt.zero_grad(set_to_none=True)
        self.restore(state, everything=False)
        for _ in range(cfg.spike.skip_batches * cfg.grad_accum):
            self.corpus.train.sample(cfg.batch_size, self.seq_len, self.gen, slice(0, 0))
        self.stats["rollbacks"] += 1
        self.rolled_back_to = self.step_no = state["step"]
        self.clean = True
        self.log.write({**row, "rollback_to": self.step_no})

    def update(self, row: dict, apply: bool, spike: bool) -> None:
        """The optimizer update (or none: a skipped step), then the step's bookkeeping."""
        if apply:
            self.opt.step()
            self.clean = not spike
            if self.clip is not None:
                clipped = self.clip.apply()
                row["qk_clip_max_logit"] = max(v.max().item() for v in clipped.max_logit.values())
                row["qk_clip_heads"] = sum(int((f < 1).sum()) for f in clipped.factor.values())
        else:
            row["skipped"] = True
            self.stats["skipped_steps"].append(self.step_no)
        self.opt.zero_grad(set_to_none=True)
        if self.diag and apply:
            t = time.perf_counter()
            row["update_ratio"] = self.ratio.ratios()
            self.t_diag += time.perf_counter() - t
        if self.d.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - self.t0
        tokens = self.cfg.batch_size * self.cfg.grad_accum * self.seq_len
        s = self.stats
        s["tokens"] += tokens
        s["train_time"] += dt
        s["diag_time"] += self.t_diag
        row["tokens_per_s"] = tokens / dt
        self.step_no += 1
        if s["first_loss"] is None:
            s["first_loss"] = row["loss"]
        s["final_loss"] = row["loss"]
        if math.isfinite(row["grad_norm"]):
            s["max_grad_norm"] = max(s["max_grad_norm"], row["grad_norm"])
        peak = max(row.get("attn_logit_max", [math.nan]))
        if math.isfinite(peak):
            s["max_attn_logit"] = max(s["max_attn_logit"] or 0.0, peak)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the same `eval_batches` windows every time."""
        cfg, d = self.cfg, self.d
        g = torch.Generator().manual_seed(cfg.seed + 1)
        self.core.eval()
        total = torch.zeros((), device=d.device)
        for _ in range(cfg.eval_batches):
            x, y = self.corpus.val.sample(cfg.batch_size, self.seq_len, g, self.rows)
            with self.autocast():
                total += self.core(x.to(d.device), y.to(d.device))[1].float()
        self.core.train()
        if cfg.fsdp:
            distributed.reshard(self.core)
        return d.mean(total / cfg.eval_batches).item()

    def _validate(self, row: dict) -> None:
        row["val_loss"] = self.stats["val_loss"] = self.evaluate()
        if self.stats["best_val_loss"] is None or row["val_loss"] < self.stats["best_val_loss"]:
            self.stats["best_val_loss"] = row["val_loss"]
        if self.rule.validation(self.step_no, row["val_loss"]):
            row["diverged"] = self.rule.reason

    # ------------------------------------------------------------ the loop

    def fit(self) -> dict:
        try:
            return self._fit()
        finally:
            self.lock.release()

    def _fit(self) -> dict:
        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step_no, desc=f"train {cfg.recipe}",
                   disable=not (self.d.main and cfg.progress), dynamic_ncols=True)
        while self.step_no < cfg.steps and self.rule.reason is None:
            pending = self.state_dict() if self._checkpoint_due() else None
            clean_before = self.clean
            row = self.step()
            action, spike = self.guard(row)
            if pending is not None:
                self.save(pending, clean_before and action == "update" and not spike and self.rule.healthy())
            del pending
            if action == "rollback":
                self.rollback(row)
                bar.n = self.step_no
                bar.refresh()
                continue
            self.update(row, action == "update", spike)
            if action != "stop" and ((cfg.eval_interval and self.step_no % cfg.eval_interval == 0) or self.step_no == cfg.steps):
                self._validate(row)
            self.log.write(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
        bar.close()
        if cfg.ckpt_interval and self.step_no == cfg.steps and self.step_no != self.last_good:
            self.save(self.state_dict(), self.clean and self.rule.healthy())
        self.log.close()
        summary = self.summary()
        if self.d.main:
            self._finish(summary)
        return summary

    def _finish(self, summary: dict) -> None:
        """summary.json and the plots, still under the lock."""
        rundir.write_json(self.out / "summary.json", summary)
        if self.cfg.plot:
            try:
                from . import plot

                summary["plots"] = [str(p) for p in plot.plot_runs([str(self.out)], str(self.out))]
            except ImportError as e:  # matplotlib is the `plot` extra
                print(f"no plots ({e}); pip install 'stableblocks[plot]'")

    def summary(self) -> dict:
        s, rule = self.stats, self.rule
        return {
            "run_dir": str(self.out), "recipe": self.cfg.recipe, "steps": self.step_no, "diverged": rule.reason is not None,
            "diverged_reason": rule.reason, "diverged_step": rule.step,
            "last_good_checkpoint": str(self.ckpt_path) if self.last_good is not None else None,
            "first_loss": s["first_loss"], "final_loss": s["final_loss"],
            "best_val_loss": s["best_val_loss"], "final_val_loss": s["val_loss"],
            "spikes": len(s["spike_steps"]), "spike_steps": s["spike_steps"],
            "skipped_steps": s["skipped_steps"], "rollbacks": s["rollbacks"],
            "max_grad_norm": s["max_grad_norm"], "max_attn_logit": s["max_attn_logit"],
            "tokens_per_s": s["tokens"] / s["train_time"] if s["train_time"] else None,
            # time in diagnostics / time in the rest of the steps, both measured in this run
            "diag_overhead": s["diag_time"] / (s["train_time"] - s["diag_time"]) if s["train_time"] else None,
        }
