"""stableblocks train: pre-train a StableGPT with a recipe and watch its stability diagnostics.

    stableblocks train                                   # tiny model, bundled corpus, CPU-friendly
    stableblocks train --recipe vanilla --lr 1e-2 --out-dir runs/vanilla
    stableblocks train --size gpt2-124m --data.source data/fineweb10B --data.tokenizer gpt2
    stableblocks train --config my.toml --steps 2000    # a config file, then overrides
    stableblocks train --out-dir runs/vanilla --resume  # continue from runs/vanilla/ckpt.pt
    torchrun --nproc_per_node 2 -m stableblocks.train [--fsdp] ...

From Python: `run(TrainConfig(...))` or `main(["--steps", "100"])`, both returning the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal, Optional, get_type_hints

import torch
import torch.distributed as dist
import tyro
from tqdm import tqdm

from . import checkpoint, data, diagnostics
from .config import StableConfig
from .model import StableGPT
from .recipes import recipe, recipes
from .spikes import SpikeDetector

# Model sizes: a CPU-tiny default and the GPT-2 family (n_layer, n_head, n_embd, context length).
SIZES = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, seq_len=128),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, seq_len=1024),
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024, seq_len=1024),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280, seq_len=1024),
    "gpt2-1558m": dict(n_layer=48, n_head=25, n_embd=1600, seq_len=1024),
}
RecipeName = Literal[tuple(sorted(recipes()))]
SizeName = Literal[tuple(SIZES)]

# Every StableConfig field but the ones the data and --seq-len decide, as an optional override.
_hints = get_type_hints(StableConfig)
ModelOverrides = make_dataclass(
    "ModelOverrides",
    [(f.name, Annotated[Optional[_hints[f.name]], tyro.conf.arg(help=f"StableConfig.{f.name} (unset: the recipe's or size's)")],
      field(default=None))
     for f in fields(StableConfig) if f.name not in ("vocab_size", "block_size")],
)
ModelOverrides.__module__ = __name__
ModelOverrides.__doc__ = "StableConfig fields to override on top of the recipe and size (unset: the recipe's value)."


@dataclass
class DataConfig:
    """Training data (nothing is downloaded)."""

    source: str = "bundled"
    """'bundled' (King James Bible), a UTF-8 text file or folder, nanoGPT .bin files, llm.c shards (a folder or a glob)."""
    tokenizer: Literal["auto", "byte", "bpe", "gpt2"] = "auto"
    """auto: byte for text, gpt2 for .bin token files."""
    bpe_vocab_size: int = 4096
    """vocabulary of the BPE trained on the corpus (tokenizer bpe)."""
    val_fraction: float = 0.05
    """tail of the data held out for validation when the source has no val split."""
    cache_dir: Optional[str] = None
    """where tokenized text is cached (default: next to the data; ~/.cache/stableblocks for the bundled corpus)."""


@dataclass
class SpikeConfig:
    """Spike detection: value > median + k * MAD over the last `window` steps."""

    metric: Literal["loss", "grad_norm", "both"] = "loss"
    """what counts as a spike (both are always monitored and logged)."""
    window: int = 100
    k: float = 6.0
    min_history: int = 20
    guard: Literal["off", "skip", "rollback"] = "off"
    """skip: no optimizer update on a spike. rollback: reload the last checkpoint and skip batches (PaLM)."""
    skip_batches: int = 200
    """batches skipped after a rollback."""


@dataclass
class TrainConfig:
    """Pre-train a StableGPT on local data with stability diagnostics."""

    recipe: RecipeName = "stable"
    """named stabiliser preset (see the README's recipe table)."""
    size: SizeName = "tiny"
    """model size preset: tiny (CPU, minutes) or the GPT-2 family."""
    model: ModelOverrides = field(default_factory=ModelOverrides)
    """StableConfig fields set on top of the recipe and the size."""
    data: DataConfig = field(default_factory=DataConfig)
    seq_len: Optional[int] = None
    """sequence length (default: the size's context, 128 for tiny and 1024 for GPT-2)."""
    batch_size: int = 16
    """sequences per micro-step, over all processes (the same whatever the number of processes)."""
    grad_accum: int = 1
    """micro-steps per optimizer step."""
    steps: int = 300
    lr: float = 3e-3
    """peak learning rate, reached after `warmup` steps, then cosine decay to lr * min_lr_ratio."""
    warmup: int = 30
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    """AdamW weight decay on the weight matrices (the recipe decides the embeddings)."""
    grad_clip: float = 1.0
    """clip the global gradient norm to this (0: no clipping)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on a CUDA GPU that supports it, fp32 otherwise."""
    device: str = "auto"
    """auto: CUDA when present (cuda:LOCAL_RANK under torchrun), else CPU."""
    compile: bool = False
    """torch.compile the model (each block before sharding under --fsdp)."""
    fsdp: bool = False
    """under torchrun: shard with FSDP2 (fully_shard per block, then the root) instead of DDP."""
    seed: int = 1337
    eval_interval: int = 50
    eval_batches: int = 8
    diag_interval: int = 10
    """diagnostics every this many steps (0: off); loss, lr, grad norm and tokens/s are logged every step."""
    ckpt_interval: int = 100
    """checkpoint every this many steps and at the end (0: never)."""
    out_dir: str = "runs/train"
    resume: bool = False
    """continue from OUT_DIR/ckpt.pt."""
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    plot: bool = True
    """write PNG plots into OUT_DIR at the end."""
    progress: bool = True
    """show a progress bar and print the summary."""


# ---------------------------------------------------------------- config


def _from_dict(cls, values: dict, where: str = "config"):
    """A dataclass from a nested dict, naming any unknown key."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        sub = {"model": ModelOverrides, "data": DataConfig, "spike": SpikeConfig}.get(name) if cls is TrainConfig else None
        kwargs[name] = _from_dict(sub, value, f"{where}.{name}") if sub and isinstance(value, dict) else value
    return cls(**kwargs)


def load_config(path: str | Path) -> TrainConfig:
    """A TrainConfig from a JSON or TOML file (a run's config.json reproduces the run)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: no such file {str(path)!r}")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib

        values = tomllib.loads(path.read_text())
    elif path.suffix == ".json":
        values = json.loads(path.read_text())
    else:
        raise ValueError(f"--config: expected a .json or .toml file, got {str(path)!r}")
    return _from_dict(TrainConfig, values, f"--config {path}")


def parse_args(argv=None) -> TrainConfig:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    base = load_config(known.config) if known.config else TrainConfig()
    return tyro.cli(TrainConfig, args=rest, default=base, prog="stableblocks train", description=__doc__,
                    console_outputs=os.environ.get("RANK", "0") == "0")  # under torchrun, one copy of the help


def model_config(cfg: TrainConfig, vocab_size: int) -> StableConfig:
    size = dict(SIZES[cfg.size])
    seq_len = cfg.seq_len or size.pop("seq_len")
    size.pop("seq_len", None)
    overrides = {k: v for k, v in asdict(cfg.model).items() if v is not None}
    padded = -(-vocab_size // 64) * 64  # GPT-2's 50257 -> 50304, as nanoGPT
    return recipe(cfg.recipe, **{**size, **overrides}, vocab_size=padded, block_size=seq_len)


def _check(cfg: TrainConfig) -> None:
    for name in ("batch_size", "grad_accum", "steps", "eval_batches"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise ValueError(f"{name}: expected a positive int, got {getattr(cfg, name)!r}")
    for name in ("warmup", "eval_interval", "diag_interval", "ckpt_interval"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {getattr(cfg, name)!r}")
    if cfg.seq_len is not None and cfg.seq_len < 1:
        raise ValueError(f"seq_len: expected a positive int, got {cfg.seq_len!r}")
    if not cfg.lr > 0:
        raise ValueError(f"lr: expected a positive float, got {cfg.lr!r}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio: expected a ratio in [0, 1], got {cfg.min_lr_ratio!r}")
    if cfg.grad_clip < 0:
        raise ValueError(f"grad_clip: expected >= 0 (0: off), got {cfg.grad_clip!r}")
    if cfg.recipe not in recipes():
        raise ValueError(f"recipe: expected one of {sorted(recipes())}, got {cfg.recipe!r}")
    if cfg.size not in SIZES:
        raise ValueError(f"size: expected one of {list(SIZES)}, got {cfg.size!r}")


class WarmupCosine:
    """LR factor: linear warmup to 1 over `warmup` steps, cosine decay to `min_ratio` at `steps`."""

    def __init__(self, warmup: int, steps: int, min_ratio: float):
        self.warmup, self.steps, self.min_ratio = warmup, steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
            t = t / self.world
        return t


def _setup(cfg: TrainConfig) -> Dist:
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # torchrun
    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if not launched:
        if cfg.fsdp:
            raise ValueError("fsdp: FSDP2 needs a process group; launch with torchrun --nproc_per_node N -m stableblocks.train --fsdp")
        device = torch.device("cuda" if cuda else "cpu") if cfg.device == "auto" else torch.device(cfg.device)
        return Dist(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu") if cfg.device in ("auto", "cuda") else torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    return Dist(dist.get_rank(), dist.get_world_size(), device, owns)


def _wrap(model: StableGPT, cfg: TrainConfig, d: Dist):
    """(what training calls, the module diagnostics and checkpoints read)."""
    if cfg.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(d.device.type, (d.world,))
        for block in model.blocks:
            if cfg.compile:
                block.compile()  # torchtitan's order: compile, then shard
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model
    if cfg.compile:
        model.compile()
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None), model
    return model, model


def _reshard(core) -> None:
    """After a no-grad forward under FSDP2: the root keeps its gathered weights after forward
    (for the backward that never comes) and the next forward would reuse them after the
    optimizer has changed the shards. Drop them."""
    from torch.distributed.fsdp import FSDPModule

    for m in core.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _grad_sync(net, core, cfg: TrainConfig, sync: bool):
    """Gradient all-reduce only on the last micro-step of an accumulation."""
    if cfg.fsdp:
        core.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(net, "no_sync"):
        return net.no_sync()
    return contextlib.nullcontext()


# ---------------------------------------------------------------- run


def run(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; returns the summary (also written to OUT_DIR/summary.json)."""
    _check(cfg)
    d = _setup(cfg)
    try:
        return _train(cfg, d)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _autocast(cfg: TrainConfig, device: torch.device):
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16":
        return precision, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return precision, contextlib.nullcontext


class _Log:
    """metrics.jsonl, written by rank 0 a line at a time (a killed run keeps what it logged)."""

    def __init__(self, path: Path, keep_before: int | None, active: bool):
        self.path, self.file = path, None
        if not active:
            return
        rows = []
        if keep_before is not None and path.exists():
            rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < keep_before]
        path.write_text("".join(r + "\n" for r in rows))
        self.file = open(path, "a")

    def write(self, row: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _train(cfg: TrainConfig, d: Dist) -> dict:
    out = Path(cfg.out_dir)
    ckpt_path = out / checkpoint.FILE
    resumed = checkpoint.load(ckpt_path) if cfg.resume else None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)

    # Rank 0 tokenizes (and caches) first; the others then read the cache.
    load = lambda: data.load(cfg.data.source, cfg.data.tokenizer, val_fraction=cfg.data.val_fraction,  # noqa: E731
                             cache_dir=cfg.data.cache_dir, bpe_vocab_size=cfg.data.bpe_vocab_size)
    corpus = load() if d.main else None
    d.barrier()
    corpus = corpus or load()

    mcfg = model_config(cfg, corpus.vocab_size)
    seq_len = mcfg.block_size
    if cfg.batch_size % d.world:
        raise ValueError(f"batch_size: {cfg.batch_size} sequences do not split over {d.world} processes")
    local = cfg.batch_size // d.world
    rows = slice(d.rank * local, (d.rank + 1) * local)
    if resumed is not None and resumed["model_config"] != asdict(mcfg):
        diff = sorted(k for k, v in asdict(mcfg).items() if resumed["model_config"].get(k) != v)
        raise ValueError(f"resume: the checkpoint's model differs in {diff}; pass the run's settings (see {out / 'config.json'})")

    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    model = StableGPT(mcfg).to(d.device)
    n_params = model.num_params()
    net, core = _wrap(model, cfg, d)
    opt = core.configure_optimizers(cfg.weight_decay, cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    schedule = WarmupCosine(cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    precision, autocast = _autocast(cfg, d.device)
    torch.manual_seed(cfg.seed + d.rank)  # dropout streams differ across processes
    gen = torch.Generator().manual_seed(cfg.seed)  # the data position: batches are random windows
    detectors = {"loss": SpikeDetector(cfg.spike.window, cfg.spike.k, cfg.spike.min_history),
                 "grad_norm": SpikeDetector(cfg.spike.window, cfg.spike.k, cfg.spike.min_history)}
    watched = ("loss", "grad_norm") if cfg.spike.metric == "both" else (cfg.spike.metric,)
    stats = {"first_loss": None, "best_val_loss": None, "val_loss": None, "spike_steps": [], "skipped_steps": [],
             "rollbacks": 0, "max_grad_norm": 0.0, "max_attn_logit": None, "tokens": 0, "train_time": 0.0, "diag_time": 0.0}

    def restore(state: dict, everything: bool) -> None:
        checkpoint.load_training_state(core, opt, state["model"], state["optimizer"])
        sched.load_state_dict(state["scheduler"])  # (also overwrites the schedule's settings)
        # The schedule is this run's config (a resumed run may be longer); the step is the checkpoint's.
        schedule.__init__(cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        sched.base_lrs = [cfg.lr] * len(opt.param_groups)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * schedule(sched.last_epoch)
        if everything:
            gen.set_state(state["data"])
            rngs = state["rng"]
            if len(rngs) == d.world:
                checkpoint.set_rng_state(rngs[d.rank])
            for name, det in detectors.items():
                det.load_state_dict(state["spikes"][name])
            stats.update(state["stats"])

    start = 0
    last_ckpt = {"step": None}
    if resumed is not None:
        restore(resumed, everything=True)
        start = last_ckpt["step"] = resumed["step"]

    if d.main:
        run_info = {"config": asdict(cfg), "model_config": asdict(mcfg), "params": n_params, "world_size": d.world,
                    "device": str(d.device), "precision": precision, "tokenizer": getattr(corpus.tokenizer, "name", None),
                    "train_tokens": len(corpus.train), "val_tokens": len(corpus.val)}
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        (out / "run.json").write_text(json.dumps(run_info, indent=2) + "\n")
    log = _Log(out / "metrics.jsonl", start if resumed is not None else None, d.main)

    def save_checkpoint(step: int) -> None:
        model_state, optim_state = checkpoint.training_state(core, opt)
        rngs = checkpoint.gather_rng_states()
        if d.main:
            checkpoint.save({
                "step": step, "model": model_state, "optimizer": optim_state, "scheduler": sched.state_dict(),
                "data": gen.get_state(), "rng": rngs, "spikes": {k: v.state_dict() for k, v in detectors.items()},
                "stats": stats, "config": asdict(cfg), "model_config": asdict(mcfg), "world_size": d.world,
            }, ckpt_path)
        last_ckpt["step"] = step
        d.barrier()  # the file is whole before anyone may read it back

    @torch.no_grad()
    def evaluate() -> float:
        g = torch.Generator().manual_seed(cfg.seed + 1)  # the same validation windows every time
        core.eval()
        total = torch.zeros((), device=d.device)
        for _ in range(cfg.eval_batches):
            x, y = corpus.val.sample(cfg.batch_size, seq_len, g, rows)
            with autocast():
                total += core(x.to(d.device), y.to(d.device))[1].float()
        core.train()
        if cfg.fsdp:
            _reshard(core)
        return d.mean(total / cfg.eval_batches).item()

    tokens_per_step = cfg.batch_size * cfg.grad_accum * seq_len
    ratio = diagnostics.UpdateRatio(core)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.recipe}", disable=not (d.main and cfg.progress), dynamic_ncols=True)
    rolled_back_to = None
    nonfinite_run = 0
    diverged = False
    step = start
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(cfg.grad_accum):
            x, y = corpus.train.sample(cfg.batch_size, seq_len, gen, rows)
            with _grad_sync(net, core, cfg, micro == cfg.grad_accum - 1), autocast():
                _, loss = net(x.to(d.device), y.to(d.device))
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        loss_value = d.mean(loss_sum / cfg.grad_accum).item()
        grad_norm = torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.grad_clip or float("inf"))
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        row = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm}

        diag = cfg.diag_interval > 0 and step % cfg.diag_interval == 0
        t_diag = time.perf_counter()
        if diag:
            row["grad_norm_layers"] = diagnostics.grad_norms(core)
            probe_x, _ = corpus.train.sample(1, seq_len, torch.Generator().manual_seed(cfg.seed + 2 + step))
            row.update(diagnostics.probe(core, probe_x.to(d.device), autocast))
            if cfg.fsdp:
                _reshard(core)
            ratio.snapshot()
        t_diag = time.perf_counter() - t_diag

        tripped = [name for name, value in (("loss", loss_value), ("grad_norm", grad_norm)) if detectors[name].update(value)]
        if tripped:
            row["spike_on"] = tripped
        # A non-finite gradient poisons the weights even when the loss was finite.
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        spike = any(name in watched for name in tripped) or not finite
        nonfinite_run = 0 if finite else nonfinite_run + 1
        if not finite and (cfg.spike.guard == "off" or nonfinite_run >= 10):
            diverged = True
        if spike:
            stats["spike_steps"].append(step)

        if (spike and cfg.spike.guard == "rollback" and not diverged and last_ckpt["step"] is not None
                and last_ckpt["step"] < step and rolled_back_to != last_ckpt["step"]):
            # PaLM's remedy: back to the last checkpoint, then past the batches around the spike.
            # Once per checkpoint: a spike that comes back is skipped instead.
            state = checkpoint.load(ckpt_path)
            opt.zero_grad(set_to_none=True)
            restore(state, everything=False)
            for _ in range(cfg.spike.skip_batches * cfg.grad_accum):
                corpus.train.sample(cfg.batch_size, seq_len, gen, slice(0, 0))
            stats["rollbacks"] += 1
            rolled_back_to = step = state["step"]
            log.write({**row, "rollback_to": step})
            bar.n = step
            bar.refresh()
            continue
        skipped = spike and cfg.spike.guard != "off"
        if skipped or diverged:
            row["skipped"] = True
            stats["skipped_steps"].append(step)
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if diag and not skipped and not diverged:
            t = time.perf_counter()
            row["update_ratio"] = ratio.ratios()
            t_diag += time.perf_counter() - t
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        stats["tokens"] += tokens_per_step
        stats["train_time"] += dt
        stats["diag_time"] += t_diag
        row["tokens_per_s"] = tokens_per_step / dt
        step += 1

        if stats["first_loss"] is None:
            stats["first_loss"] = loss_value
        stats["final_loss"] = loss_value
        if math.isfinite(grad_norm):
            stats["max_grad_norm"] = max(stats["max_grad_norm"], grad_norm)
        peak = max(row.get("attn_logit_max", [math.nan]))
        if math.isfinite(peak):
            stats["max_attn_logit"] = max(stats["max_attn_logit"] or 0.0, peak)
        if not diverged and ((cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.steps):
            row["val_loss"] = stats["val_loss"] = evaluate()
            if stats["best_val_loss"] is None or row["val_loss"] < stats["best_val_loss"]:
                stats["best_val_loss"] = row["val_loss"]
        log.write(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
        if cfg.ckpt_interval and (step % cfg.ckpt_interval == 0 or step == cfg.steps) and not diverged:
            save_checkpoint(step)
        if diverged:
            break
    bar.close()
    log.close()

    summary = {
        "run_dir": str(out), "recipe": cfg.recipe, "steps": step, "diverged": diverged,
        "first_loss": stats["first_loss"], "final_loss": stats.get("final_loss"),
        "best_val_loss": stats["best_val_loss"], "final_val_loss": stats["val_loss"],
        "spikes": len(stats["spike_steps"]), "spike_steps": stats["spike_steps"],
        "skipped_steps": stats["skipped_steps"], "rollbacks": stats["rollbacks"],
        "max_grad_norm": stats["max_grad_norm"], "max_attn_logit": stats["max_attn_logit"],
        "tokens_per_s": stats["tokens"] / stats["train_time"] if stats["train_time"] else None,
        # time in diagnostics / time in the rest of the steps, both measured in this run
        "diag_overhead": stats["diag_time"] / (stats["train_time"] - stats["diag_time"]) if stats["train_time"] else None,
    }
    if d.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if cfg.plot:
            try:
                from . import plot

                summary["plots"] = [str(p) for p in plot.plot_runs([out], out)]
            except ImportError as e:  # matplotlib is the `plot` extra
                print(f"no plots ({e}); pip install 'stableblocks[plot]'")
        if cfg.progress:
            _print_summary(summary)
    return summary


def _print_summary(s: dict) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    status = "DIVERGED" if s["diverged"] else "done"
    print(f"{status}: {s['recipe']}, {s['steps']} steps -> {s['run_dir']}")
    print(f"  loss {fmt(s['first_loss'])} -> {fmt(s['final_loss'])}; best val loss {fmt(s['best_val_loss'])}")
    spikes = ", ".join(map(str, s["spike_steps"][:20])) + (" ..." if len(s["spike_steps"]) > 20 else "")
    print(f"  spikes: {s['spikes']}" + (f" at steps {spikes}" if s["spikes"] else "")
          + (f"; {len(s['skipped_steps'])} updates skipped" if s["skipped_steps"] else "")
          + (f"; {s['rollbacks']} rollbacks" if s["rollbacks"] else ""))
    print(f"  max grad norm {fmt(s['max_grad_norm'])}; max |attention logit| {fmt(s['max_attn_logit'])}; "
          f"{s['tokens_per_s'] or 0:.0f} tokens/s; diagnostics {100 * (s['diag_overhead'] or 0):.1f}% of step time")


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
