"""What the stability benchmark trains: one RunSpec per training run, grouped in arms.

A run's result is stored under the hash of what decides it (RunSpec.key: the spec and the
recipe's full StableConfig fields; not the training code: after a change to the model or the
loop, delete runs.jsonl to retrain everything), so arms that ask for the same run share it, a
rerun trains only what is missing or changed, and the full benchmark can be completed in parts. The two arms
that adapt (the lr bracket and the failure boundary) read the results so far and ask for more.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace

from stableblocks.recipes import RECIPES, STABLE

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
assert STABLE in VARIANTS, f"the stable recipe {STABLE!r} needs a row: the benchmark is what chose it"

# Learning rates every arm draws from: half decades from 1e-4 to 1.
LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


@dataclass(frozen=True)
class Scale:
    """What one mode trains: the variants of each arm, the model, data and run length."""

    variants: tuple = tuple(VARIANTS)  # the lr bracket
    start: tuple = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # the bracket's first grid
    # The headline recipes: the failure boundary, the seeds and the rule for `stable`.
    headline: tuple = tuple(dict.fromkeys(("vanilla", "scaled-embed", "embed-ln", "qk-norm", "qk-norm-cap", "qkv-norm",
                                           STABLE)))
    seeded_lrs: tuple = (3e-3, 1e-2, 1e-1)
    seeds: tuple = (0, 1, 2)
    bisections: int = 2  # refinements of each failure boundary between two ladder rungs
    embedding: tuple = ("vanilla", "scaled-embed", "embed-ln")  # the depth arm and the ablations
    deep_layers: int = 12
    steps: int = 300
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    seq_len: int = 128
    batch_size: int = 16
    init_layers: int = 24  # the gradients-at-init model: deep and narrow
    init_width: int = 256


FULL = Scale()
QUICK = Scale(variants=("vanilla", "qk-norm"), start=(1e-3, 1e-2, 1e-1), headline=("vanilla", "qk-norm"),
              seeded_lrs=(1e-2,), seeds=(0, 1), bisections=1, embedding=("vanilla",), deep_layers=3,
              steps=20, n_layer=2, n_embd=64, seq_len=64, batch_size=8, init_layers=6, init_width=64)


@dataclass(frozen=True)
class RunSpec:
    variant: str  # a VARIANTS label
    lr: float
    seed: int
    steps: int
    n_layer: int
    n_head: int
    n_embd: int
    seq_len: int
    batch_size: int
    grad_clip: float = 1.0
    weight_decay: float = 0.1
    tokenizer: str = "byte"  # or "bpe" (bpe_vocab_size tokens, trained on the corpus)
    bpe_vocab_size: int = 512
    extra: tuple = field(default=())  # further StableConfig overrides, sorted (name, value) pairs

    @property
    def recipe(self) -> str:
        return VARIANTS[self.variant][0]

    def overrides(self) -> dict:
        return {**VARIANTS[self.variant][1], **dict(self.extra)}

    def config(self) -> dict:
        """The StableConfig technique fields this run trains with (the recipe's, then overrides)."""
        return {**RECIPES[self.recipe][2], **self.overrides()}

    def key(self) -> str:
        """Hash of everything that decides the run: a changed recipe changes its runs' keys."""
        text = json.dumps({"spec": asdict(self), "config": self.config()}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def name(self) -> str:
        bits = [self.variant, f"lr{self.lr:g}", f"s{self.seed}", f"L{self.n_layer}"]
        bits += [] if self.grad_clip else ["noclip"]
        bits += [] if self.weight_decay else ["nowd"]
        bits += [] if self.tokenizer == "byte" else [f"{self.tokenizer}{self.bpe_vocab_size}"]
        bits += [f"{k}={v}" for k, v in self.extra]
        return "_".join(bits)


def spec(scale: Scale, variant: str, lr: float, seed: int = 0, **kw) -> RunSpec:
    extra = tuple(sorted(kw.pop("extra", {}).items()))
    return RunSpec(variant, lr, seed, scale.steps, scale.n_layer, scale.n_head, scale.n_embd, scale.seq_len,
                   scale.batch_size, extra=extra, **kw)


def loss(results: dict, s: RunSpec) -> float | None:
    """Final validation loss of a finished run (nan when it diverged); None when not run yet."""
    r = results.get(s.key())
    return None if r is None else r["result"]["final_val_loss"]


# ---------------------------------------------------------------------------------------- arms
# Each arm: (scale, results so far) -> the specs it needs now. An adaptive arm asks for more once
# the runs it has asked for are done.


def bracket(scale: Scale, results: dict) -> list[RunSpec]:
    """Every variant over the start grid, extended a rung at a time on the side of its best lr until the
    best is an interior point of its grid or the ladder ends (then marked as on the edge)."""
    out = []
    for v in scale.variants:
        lrs = list(scale.start)
        while True:
            specs = [spec(scale, v, lr) for lr in lrs]
            out += specs
            losses = [loss(results, s) for s in specs]
            if any(x is None for x in losses):
                break
            finite = {lr: x for lr, x in zip(lrs, losses) if math.isfinite(x)}
            if not finite:
                break
            best = min(finite, key=finite.get)
            i = LADDER.index(best)
            if best == lrs[0] and i > 0:
                lrs.insert(0, LADDER[i - 1])
            elif best == lrs[-1] and i + 1 < len(LADDER):
                lrs.append(LADDER[i + 1])
            else:
                break
    return out


def boundary(scale: Scale, results: dict, trained) -> list[RunSpec]:
    """The largest lr that still trains, for each headline recipe, with gradient clipping on and
    off: the ladder from 1e-2 (clip off) or 1e-1 (on) up to 1, then `bisections` geometric
    midpoints between the last rung that trains and the first that does not."""
    out = []
    for v in scale.headline:
        for clip, lowest in ((1.0, 1e-1), (0.0, 1e-2)):
            rungs = [lr for lr in LADDER if lr >= lowest]
            specs = [spec(scale, v, lr, grad_clip=clip) for lr in rungs]
            out += specs
            if any(s.key() not in results for s in specs):
                continue
            ok = [s.lr for s in specs if trained(results[s.key()])]
            bad = [s.lr for s in specs if not trained(results[s.key()]) and (not ok or s.lr > max(ok))]
            lo, hi = (max(ok) if ok else None), (min(bad) if bad else None)
            for _ in range(scale.bisections if lo and hi else 0):
                mid = float(f"{math.sqrt(lo * hi):.3g}")
                s = spec(scale, v, mid, grad_clip=clip)
                out.append(s)
                if s.key() not in results:
                    break
                lo, hi = (mid, hi) if trained(results[s.key()]) else (lo, mid)
    return out


def seeds(scale: Scale, results: dict) -> list[RunSpec]:
    return [spec(scale, v, lr, seed) for v in scale.headline for lr in scale.seeded_lrs for seed in scale.seeds]


DEPTH_LRS = (3e-3, 3e-2)


def depth(scale: Scale, results: dict) -> list[RunSpec]:
    return [replace(spec(scale, v, lr), n_layer=scale.deep_layers) for v in scale.embedding for lr in DEPTH_LRS]


# Output-logit divergence (Wortsman et al.): no weight decay at a high lr, then z-loss or a
# final-logit soft-cap on top; the same run with weight decay is the bracket's.
OUTPUT_LOGIT_LR = 1e-1
OUTPUT_LOGIT_ARMS = {"weight decay 0.1": dict(), "no weight decay": dict(weight_decay=0.0),
                     "no weight decay, z-loss 1e-4": dict(weight_decay=0.0, extra={"z_loss": 1e-4}),
                     "no weight decay, final-logit cap 30": dict(weight_decay=0.0, extra={"logit_softcap": 30.0})}


def output_logits(scale: Scale, results: dict) -> list[RunSpec]:
    return [spec(scale, "vanilla", OUTPUT_LOGIT_LR, **kw) for kw in OUTPUT_LOGIT_ARMS.values()]


# What might cost the embedding fixes their loss: each ablation changes one thing, for vanilla and
# both fixes, at vanilla's best lr of the first grid.
ABLATION_LR = 1e-2
ABLATIONS = {"as in the bracket": dict(), "untied embeddings": dict(extra={"tie_embeddings": False}),
             "embeddings weight-decayed": dict(extra={"embed_weight_decay": True}),
             "BPE, 512 tokens": dict(tokenizer="bpe")}


def ablations(scale: Scale, results: dict) -> list[RunSpec]:
    return [spec(scale, v, ABLATION_LR, **kw) for v in scale.embedding for kw in ABLATIONS.values()]


def plan(scale: Scale, results: dict, trained) -> list[RunSpec]:
    """Every run the benchmark needs given the results so far, each once, in the order to run
    them: the cheap, decisive arms first."""
    specs = (boundary(scale, results, trained) + bracket(scale, results) + seeds(scale, results)
             + output_logits(scale, results) + ablations(scale, results) + depth(scale, results))
    return list({s.key(): s for s in specs}.values())
