"""CPU training throughput, measured in one process with the contenders interleaved.

- StableGPT's reference path against nanoGPT's plain GPT-2 (benchmarks/nanogpt.py) of the same
  shape, same batches, same optimizer settings: tokens/s per repeat, medians and the ratio.
- The diagnostics' overhead in the training command: tokens/s with and without them.

The machine may be shared: each repeat runs every contender once, in a rotating order, and the
report uses medians over repeats.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
import time

import numpy as np
import torch

import stableblocks as sb
from stableblocks.kernels import backend
from stableblocks import data

from . import nanogpt

# The training command's small default shape (stableblocks train).
SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, vocab_size=256)


def _models(shape: dict, recipes) -> dict:
    out = {}
    torch.manual_seed(0)
    cfg = nanogpt.GPTConfig(block_size=shape["block_size"], vocab_size=shape["vocab_size"], n_layer=shape["n_layer"],
                            n_head=shape["n_head"], n_embd=shape["n_embd"])
    model = nanogpt.GPT(cfg)
    out["nanogpt"] = (model, model.configure_optimizers(0.1, 1e-3))
    for recipe in recipes:
        torch.manual_seed(0)
        cfg = sb.recipe(recipe, vocab_size=shape["vocab_size"], n_layer=shape["n_layer"], n_head=shape["n_head"],
                        n_embd=shape["n_embd"], block_size=shape["block_size"])
        model = sb.StableGPT(cfg)
        out[f"stablegpt:{recipe}"] = (model, model.configure_optimizers(0.1, 1e-3))
    return out


def _train(model, opt, loss_fn, batches) -> None:
    for x, y in batches:
        loss = model(x, y)[1] if loss_fn is None else loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def _summary(values: list[float]) -> dict:
    return {"p50": statistics.median(values), "p20": float(np.percentile(values, 20)),
            "p80": float(np.percentile(values, 80)), "runs": values}


def _rounds(contenders: dict, shape: dict, rounds: int, warmup: int, progress, label: str) -> dict:
    """{name: [tokens/s per step]}. contenders: name -> (model, optimizer, loss_fn or None).

    A round trains every contender one step on the same batch, in a rotating order: a ratio then
    compares steps a few hundred milliseconds apart, so most of a shared machine's drift cancels.
    Measured on 2 shared cores: the stable/nanoGPT ratio spread over 0.918-0.946 in three runs of
    blocks of ten steps per contender, and over 0.933-0.952 in five runs of 120 rounds."""
    stream = data.load("bundled", "byte").train
    gen = torch.Generator().manual_seed(0)
    batches = [tuple(t.contiguous() for t in stream.sample(shape["batch_size"], shape["block_size"], gen))
               for _ in range(10)]
    for contender in contenders.values():
        _train(*contender, batches[:warmup])
    names = list(contenders)
    runs = {name: [] for name in names}
    tokens = shape["batch_size"] * shape["block_size"]
    for r in range(rounds):
        if progress and r % 10 == 0:
            progress(f"{label} round {r + 1}/{rounds}")
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            _train(*contenders[name], [batches[r % len(batches)]])
            runs[name].append(tokens / (time.perf_counter() - t0))
    return runs


def training_throughput(shape: dict | None = None, recipes=("gpt2", "stable"), rounds: int = 120, warmup: int = 3,
                        progress=None) -> dict:
    """{contender: {p50, p20, p80, runs}} in tokens/s per step, plus "ratio:<recipe>" = median over
    rounds of (StableGPT tokens/s / nanoGPT tokens/s in the same round)."""
    shape = dict(SHAPE if shape is None else shape)
    with backend.using("reference"):
        contenders = {name: (model, opt, None) for name, (model, opt) in _models(shape, recipes).items()}
        runs = _rounds(contenders, shape, rounds, warmup, progress, "throughput")
    out = {name: _summary(v) for name, v in runs.items()}
    for recipe in recipes:
        out[f"ratio:{recipe}"] = _summary([s / n for s, n in zip(runs[f"stablegpt:{recipe}"], runs["nanogpt"])])
    out["shape"] = shape
    return out


def eager_loss(model, x, y) -> torch.Tensor:
    """The loss on materialised logits (F.cross_entropy in fp32, z-loss on their log-sum-exp), as
    StableGPT computed it before fused_linear_cross_entropy."""
    logits, _ = model(x)
    logits, y = logits.float().flatten(0, 1), y.flatten()
    loss = torch.nn.functional.cross_entropy(logits, y, ignore_index=-1)
    if model.config.z_loss:
        kept = y != -1
        loss = loss + model.config.z_loss * torch.logsumexp(logits, dim=-1)[kept].pow(2).mean()
    return loss


def loss_throughput(shape: dict | None = None, recipe: str = "stable", rounds: int = 120, warmup: int = 3,
                    progress=None) -> dict:
    """Tokens/s of StableGPT training (the main job's recipe and shape, reference path) with the loss
    from fused_linear_cross_entropy and with the eager loss; "ratio" = median of fused / eager per round."""
    shape = dict(SHAPE if shape is None else shape)
    with backend.using("reference"):
        cfg = sb.recipe(recipe, vocab_size=shape["vocab_size"], n_layer=shape["n_layer"], n_head=shape["n_head"],
                        n_embd=shape["n_embd"], block_size=shape["block_size"])
        contenders = {}
        for name, loss_fn in (("fused", None), ("eager", eager_loss)):
            torch.manual_seed(0)
            model = sb.StableGPT(cfg)
            contenders[name] = (model, model.configure_optimizers(0.1, 1e-3), loss_fn)
        runs = _rounds(contenders, shape, rounds, warmup, progress, "loss throughput")
    out = {name: _summary(v) for name, v in runs.items()}
    out["ratio"] = _summary([f / e for f, e in zip(runs["fused"], runs["eager"])])
    out["shape"], out["recipe"] = shape, recipe
    return out


def diagnostics_overhead(steps: int = 40, repeats: int = 3, progress=None) -> dict:
    """Tokens/s of the training command (stableblocks.train.run) with diagnostics at their default
    interval, every step, and off; interleaved; the command's own tokens/s (its step time includes
    the diagnostics)."""
    from stableblocks import train

    config = train.TrainConfig
    variants = {"default": config.diag_interval, "every step": 1, "off": 0}
    runs = {name: [] for name in variants}
    # The CPU training path, whatever TRITON_INTERPRET says.
    with backend.using("reference"):
        with tempfile.TemporaryDirectory() as tmp:
            # overwrite: each variant's run replaces the last one's files in this throwaway folder.
            base = dict(steps=steps, eval_interval=0, ckpt_interval=0, plot=False, progress=False, out_dir=tmp, overwrite=True,
                        batch_size=SHAPE["batch_size"], seq_len=SHAPE["block_size"], size="tiny", warmup=min(10, steps))
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                train.run(config(**base, diag_interval=0))  # one-time costs (corpus cache, first allocations)
            order = list(variants)
            for r in range(repeats):
                if progress:
                    progress(f"diagnostics overhead repeat {r + 1}/{repeats}")
                for name in order[r % len(order):] + order[: r % len(order)]:
                    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                        summary = train.run(config(**base, diag_interval=variants[name]))
                    runs[name].append(summary["tokens_per_s"])
    out = {name: _summary(v) for name, v in runs.items()}
    for name in ("default", "every step"):
        out[f"ratio:{name}"] = _summary([w / o for w, o in zip(runs[name], runs["off"])])
    out["interval"] = variants["default"]
    out["status"] = "measured"
    return out
