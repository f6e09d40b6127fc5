"""stableblocks train: pre-train a small StableGPT with a recipe on the bundled corpus."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import data
from .model import StableGPT
from .recipes import recipe, recipes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stableblocks train", description=__doc__)
    p.add_argument("--recipe", default="stable", choices=sorted(recipes()))
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out-dir", type=Path, default=Path("runs/train"))
    return p.parse_args(argv)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, tokens, args, generator, batches: int = 8) -> float:
    model.eval()
    losses = [model(*data.get_batch(tokens, args.batch_size, args.block_size, generator))[1].item() for _ in range(batches)]
    model.train()
    return sum(losses) / len(losses)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train_tokens, val_tokens = data.split(data.byte_tokens(data.bundled_text()))
    cfg = recipe(args.recipe, vocab_size=256, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size)
    model = StableGPT(cfg)
    opt = model.configure_optimizers(args.weight_decay, args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    val_gen = torch.Generator().manual_seed(args.seed + 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    history = []
    bar = tqdm(range(args.steps), desc=f"train {args.recipe}")
    t0 = time.perf_counter()
    for step in bar:
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = data.get_batch(train_tokens, args.batch_size, args.block_size, gen)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip).item()
        opt.step()
        record = {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm}
        if (step + 1) % args.eval_interval == 0 or step + 1 == args.steps:
            record["val_loss"] = evaluate(model, val_tokens, args, val_gen)
        history.append(record)
        tok_s = (step + 1) * args.batch_size * args.block_size / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:.0f}")
    with open(args.out_dir / "metrics.jsonl", "w") as f:
        for r in history:
            f.write(json.dumps(r) + "\n")
    summary = {"recipe": args.recipe, "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
               "val_loss": history[-1]["val_loss"]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
