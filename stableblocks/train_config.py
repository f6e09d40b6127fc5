"""The training run's config: dataclasses, parsing (command line and config files) and validation.

Every TrainConfig, whether it comes from the command line, a config file or Python, goes through
`validate`: types, choices and ranges, each error naming the key and what it expects.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional, get_type_hints

import tyro

from .config import ACTIVATIONS, INITS, StableConfig
from .recipes import recipe, recipes
from .spikes import MARGIN, DivergenceRule, SpikeDetector

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
_hints = {**get_type_hints(StableConfig), "init": Literal[INITS], "activation": Literal[ACTIVATIONS]}
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
    """steps in the running median and MAD."""
    k: float = 6.0
    """a spike is above median + k * MAD."""
    min_history: int = 20
    """steps seen before any step can be a spike."""
    guard: Literal["off", "skip", "rollback"] = "off"
    """skip: no optimizer update on a spike. rollback: reload the last good checkpoint and skip batches (PaLM)."""
    skip_batches: int = 200
    """batches skipped after a rollback."""


@dataclass
class DivergeConfig:
    """When a run has diverged and stops (exit status 3): see the README's Training section."""

    margin: float = MARGIN
    """threshold = max(first loss, ln(vocabulary size)) * margin."""
    patience: int = 20
    """consecutive steps the smoothed training loss may stay above the threshold."""
    max_skipped: int = 20
    """consecutive steps the spike guard may skip or roll back."""


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
    """optimizer steps of the whole run (a resumed run may raise it)."""
    lr: float = 3e-3
    """peak learning rate, reached after `warmup` steps, then cosine decay to lr * min_lr_ratio."""
    warmup: int = 30
    """steps of linear learning-rate warmup."""
    min_lr_ratio: float = 0.1
    """the learning rate at the last step, as a fraction of --lr."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay."""
    eps: float = 1e-8
    """AdamW's epsilon."""
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
    """initial weights, data order and validation windows."""
    eval_interval: int = 50
    """validation loss every this many steps and at the end (0: only at the end)."""
    eval_batches: int = 8
    """batches per validation loss."""
    diag_interval: int = 10
    """diagnostics every this many steps (0: off); loss, lr, grad norm and tokens/s are logged every step."""
    ckpt_interval: int = 100
    """checkpoint every this many steps and at the end (0: never); only good states are written."""
    out_dir: str = "runs/train"
    """the run folder: metrics, checkpoint, config, summary, plots (one run at a time)."""
    resume: bool = False
    """continue the run in OUT_DIR from its checkpoint."""
    overwrite: bool = False
    """replace the run already in OUT_DIR (its checkpoint, metrics, config, summary and plots)."""
    allow_changes: bool = False
    """with --resume: accept changes to the data stream or the model (batch size, grad accumulation, data, seed, sequence length, recipe, size, model fields); run.json records them."""
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    diverge: DivergeConfig = field(default_factory=DivergeConfig)
    plot: bool = True
    """write PNG plots into OUT_DIR at the end."""
    progress: bool = True
    """show a progress bar and print the summary."""


_SECTIONS = {"model": ModelOverrides, "data": DataConfig, "spike": SpikeConfig, "diverge": DivergeConfig}
# What alters the data stream or the model: a resumed run must keep these (or pass --allow-changes).
STREAM_KEYS = ("recipe", "size", "seq_len", "batch_size", "grad_accum", "seed",
               "data.source", "data.tokenizer", "data.bpe_vocab_size", "data.val_fraction")


# ---------------------------------------------------------------- types and values


def _expected(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in args)
    return {type(None): "null", bool: "true/false", int: "an int", float: "a number", str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def _fits(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_types(obj, where: str = "") -> None:
    for f in fields(obj):
        value, hint, key = getattr(obj, f.name), get_type_hints(type(obj))[f.name], f"{where}{f.name}"
        if is_dataclass(hint):
            if not isinstance(value, hint):
                raise ValueError(f"{key}: expected a table of {sorted(x.name for x in fields(hint))}, got {value!r}")
            _check_types(value, f"{key}.")
        elif not _fits(value, hint):
            guess = ""
            if typing.get_origin(hint) is Literal and isinstance(value, str):
                close = difflib.get_close_matches(value, [str(a) for a in typing.get_args(hint)], n=1)
                guess = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{key}: expected {_expected(hint)}, got {value!r}{guess}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field's type and value; the first problem raises ValueError naming the key."""
    _check_types(cfg)
    for name in ("batch_size", "grad_accum", "steps", "eval_batches"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}: expected a positive int, got {getattr(cfg, name)!r}")
    for name in ("warmup", "eval_interval", "diag_interval", "ckpt_interval"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {getattr(cfg, name)!r}")
    if cfg.seq_len is not None and cfg.seq_len < 1:
        raise ValueError(f"seq_len: expected a positive int, got {cfg.seq_len!r}")
    for name, ok, expected in (("lr", cfg.lr > 0 and math.isfinite(cfg.lr), "a positive float"),
                               ("min_lr_ratio", 0 <= cfg.min_lr_ratio <= 1, "a ratio in [0, 1]"),
                               ("grad_clip", cfg.grad_clip >= 0, ">= 0 (0: off)"),
                               ("beta1", 0 <= cfg.beta1 < 1, "a float in [0, 1)"), ("beta2", 0 <= cfg.beta2 < 1, "a float in [0, 1)"),
                               ("eps", cfg.eps > 0, "a positive float"), ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
                               ("data.val_fraction", 0 < cfg.data.val_fraction < 1, "a fraction in (0, 1)"),
                               ("data.source", cfg.data.source.strip() != "", "'bundled', a file, a folder or a glob"),
                               ("data.bpe_vocab_size", cfg.data.bpe_vocab_size > 256, "an int > 256 (the 256 bytes come first)")):
        if not ok:
            raise ValueError(f"{name}: expected {expected}, got {_get(cfg, name)!r}")
    if cfg.resume and cfg.overwrite:
        raise ValueError("resume, overwrite: pass one; --resume continues the run in OUT_DIR, --overwrite replaces it")
    if cfg.allow_changes and not cfg.resume:
        raise ValueError("allow_changes: only means something with --resume")
    s, v = cfg.spike, cfg.diverge
    SpikeDetector(s.window, s.k, s.min_history)
    DivergenceRule(2, v.margin, v.patience, v.max_skipped)
    if s.skip_batches < 0:
        raise ValueError(f"spike.skip_batches: expected an int >= 0, got {s.skip_batches!r}")
    model_config(cfg, 256)  # the model fields, checked by StableConfig
    return cfg


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def model_config(cfg: TrainConfig, vocab_size: int) -> StableConfig:
    size = dict(SIZES[cfg.size])
    seq_len = cfg.seq_len or size.pop("seq_len")
    size.pop("seq_len", None)
    overrides = {k: v for k, v in asdict(cfg.model).items() if v is not None}
    padded = -(-vocab_size // 64) * 64  # GPT-2's 50257 -> 50304, as nanoGPT
    return recipe(cfg.recipe, **{**size, **overrides}, vocab_size=padded, block_size=seq_len)


# ---------------------------------------------------------------- files and the command line


def from_dict(values: dict, where: str = "config", cls=TrainConfig):
    """A config from a nested dict, naming any unknown key (and the closest known one)."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a table of {sorted(f.name for f in fields(cls))}, got {values!r}")
    known = {f.name for f in fields(cls)}
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            raise ValueError(f"{where}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; expected some of {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        sub = _SECTIONS.get(name) if cls is TrainConfig else None
        kwargs[name] = from_dict(value, f"{where}.{name}", sub) if sub else value
    return cls(**kwargs)


def load_config(path: str | Path) -> TrainConfig:
    """A validated TrainConfig from a JSON or TOML file (a run's config.json reproduces the run)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: no such file {str(path)!r}")
    try:
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
        return validate(from_dict(values, f"--config {path}"))
    except (ValueError, TypeError) as e:  # JSON/TOML syntax errors are ValueErrors too
        msg = str(e)
        raise ValueError(msg if msg.startswith("--config") else f"--config {path}: {msg}") from None


def parse_args(argv=None, description: str | None = None) -> TrainConfig:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    base = load_config(known.config) if known.config else TrainConfig()
    cfg = tyro.cli(TrainConfig, args=rest, default=base, prog="stableblocks train", description=description,
                   console_outputs=os.environ.get("RANK", "0") == "0")  # under torchrun, one copy of the help
    return validate(cfg)


def flat(cfg: TrainConfig | dict) -> dict:
    """{"data.source": ..., "lr": ...}: a config as dotted keys."""
    d = asdict(cfg) if not isinstance(cfg, dict) else cfg
    return {f"{k}.{kk}" if isinstance(v, dict) else k: vv
            for k, v in d.items() for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])}


def resume_changes(saved: dict, cfg: TrainConfig, saved_model: dict, model: StableConfig) -> tuple[dict, dict]:
    """(changes that alter the data stream or the model, the other changes) between the
    checkpoint's config and this run's, each as {key: [saved, now]}."""
    old, new = flat(saved), flat(cfg)
    ignore = ("resume", "overwrite", "allow_changes", "progress", "plot")
    changed = {k: [old.get(k), v] for k, v in new.items() if old.get(k) != v and k not in ignore and not k.startswith("model.")}
    stream = {k: v for k, v in changed.items() if k in STREAM_KEYS}
    stream.update({f"model.{k}": [saved_model.get(k), v] for k, v in asdict(model).items() if saved_model.get(k) != v})
    return stream, {k: v for k, v in changed.items() if k not in STREAM_KEYS}
