"""Tables, plots and the rule for `stable`, from the stored runs of a complete plan."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from stableblocks.checkpoint import atomic_write
from stableblocks.recipes import RECIPES

from ..report import README, replace_block
from . import plan
from .analysis import MARGIN, gradients_at_init, lr_sensitivity, trained


def _fmt(x, digits=3) -> str:
    return "—" if x is None else ("div" if isinstance(x, float) and math.isnan(x) else f"{x:.{digits}f}")


class Runs:
    """The stored records, looked up by spec."""

    def __init__(self, records: dict, threshold: float):
        self.records, self.threshold = records, threshold

    def get(self, spec: plan.RunSpec) -> dict | None:
        return self.records.get(spec.key())

    def loss(self, spec: plan.RunSpec) -> float | None:
        return plan.loss(self.records, spec)

    def verdict(self, record: dict) -> bool:
        return trained(record, self.threshold)

    def trained(self, spec: plan.RunSpec) -> bool:
        r = self.get(spec)
        return r is not None and self.verdict(r)

    def score(self, spec: plan.RunSpec) -> float:
        """The loss the rule and the seed tables average: a run that did not train (diverged,
        spiked, or above the threshold) counts as the threshold."""
        return self.loss(spec) if self.trained(spec) else self.threshold


# ------------------------------------------------------------------------------------ the arms


def bracket_table(scale: plan.Scale, runs: Runs) -> list[dict]:
    """Per variant, the grid the bracket arm asked for (other arms' runs at the same lr are not
    part of it), its best lr, and whether that best sits on the grid's edge."""
    asked = {(s.variant, s.lr) for s in plan.bracket(scale, runs.records)}
    rows = []
    for v in scale.variants:
        by_lr = {lr: runs.loss(plan.spec(scale, v, lr)) if (v, lr) in asked else None for lr in plan.LADDER}
        tried = {lr: x for lr, x in by_lr.items() if x is not None}
        finite = {lr: x for lr, x in tried.items() if math.isfinite(x)}
        best = min(finite, key=finite.get) if finite else None
        records = [runs.get(plan.spec(scale, v, lr)) for lr in tried]
        rows.append({
            "variant": v, "loss_by_lr": by_lr, "best_lr": best, "best_loss": finite.get(best),
            "edge": best is not None and best in (min(tried), max(tried)),
            # None when nothing finished: 0 (the flattest curve) would read as the best there is.
            "lr_sensitivity": lr_sensitivity({lr: tried.get(lr, math.nan) for lr in scale.start}, math.log(256))
            if finite else None,
            "max_grad_norm": max(r["result"]["max_grad_norm"] for r in records),
            "max_attn_logit": max((r["result"]["max_attn_logit"] or 0.0) for r in records),
        })
    return rows


def boundary_table(scale: plan.Scale, runs: Runs) -> list[dict]:
    """Per headline recipe and clip setting: the largest lr tried that trains, and the smallest
    above it that does not (None: every lr tried trains / none does)."""
    specs = [s for s in plan.boundary(scale, runs.records, runs.verdict) if s.key() in runs.records]
    rows = []
    for v in scale.headline:
        row = {"variant": v}
        for clip, name in ((1.0, "clip"), (0.0, "noclip")):
            lrs = sorted({s.lr for s in specs if s.variant == v and s.grad_clip == clip})
            ok = [lr for lr in lrs if runs.trained(plan.spec(scale, v, lr, grad_clip=clip))]
            top = max(ok) if ok else None
            above = [lr for lr in lrs if top is None or lr > top]
            row[name] = (top, min(above) if above else None)
        rows.append(row)
    return rows


def seed_table(scale: plan.Scale, runs: Runs) -> list[dict]:
    """Per headline recipe: mean and spread over seeds at each seeded lr, and the rule's score,
    the mean over those lrs, with its spread (the std over seeds of each seed's mean)."""
    rows = []
    for v in scale.headline:
        per_lr = {}
        for lr in scale.seeded_lrs:
            xs = [runs.score(plan.spec(scale, v, lr, seed)) for seed in scale.seeds]
            per_lr[lr] = (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)
        per_seed = [statistics.mean(runs.score(plan.spec(scale, v, lr, seed)) for lr in scale.seeded_lrs)
                    for seed in scale.seeds]
        speed = [runs.get(plan.spec(scale, v, lr, seed))["result"]["tokens_per_s"] or 0.0
                 for lr in scale.seeded_lrs for seed in scale.seeds]
        rows.append({"variant": v, "per_lr": per_lr, "score": statistics.mean(per_seed),
                     "spread": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
                     "techniques": techniques(v), "tokens_per_s": statistics.median(speed)})
    return rows


def techniques(variant: str) -> int:
    """How many StableConfig technique fields the variant sets away from vanilla's."""
    recipe, overrides = plan.VARIANTS[variant]
    mine, base = {**RECIPES[recipe][2], **overrides}, RECIPES["vanilla"][2]
    return sum(mine[k] != base[k] for k in base)


def choose_stable(seeded: list[dict], threshold: float) -> tuple[str | None, list[str]]:
    """The written rule: the lowest mean loss over the seeded lrs wins; every recipe within the
    spread of the best (its score minus the best's at most the larger of the two spreads) ties
    with it, and a tie goes to fewer techniques, then to the faster recipe. -> (winner, the tied);
    (None, []) when no recipe trains at all (every score is the threshold)."""
    best = min(seeded, key=lambda r: r["score"])
    if best["score"] >= threshold:
        return None, []
    tied = [r for r in seeded if r["score"] - best["score"] <= max(r["spread"], best["spread"])]
    winner = min(tied, key=lambda r: (r["techniques"], -r["tokens_per_s"]))
    return winner["variant"], [r["variant"] for r in tied]


def depth_table(scale: plan.Scale, runs: Runs) -> list[dict]:
    rows = []
    for v in scale.embedding:
        for layers in (scale.n_layer, scale.deep_layers):
            losses = {lr: runs.loss(plan.spec(scale, v, lr) if layers == scale.n_layer else
                                    replace(plan.spec(scale, v, lr), n_layer=layers)) for lr in plan.DEPTH_LRS}
            rows.append({"variant": v, "layers": layers, "loss_by_lr": losses})
    return rows


def output_logit_table(scale: plan.Scale, runs: Runs) -> list[dict]:
    rows = []
    for name, kw in plan.OUTPUT_LOGIT_ARMS.items():
        r = runs.get(plan.spec(scale, "vanilla", plan.OUTPUT_LOGIT_LR, **kw))
        t = r["trace"]
        rows.append({"arm": name, "loss": r["result"]["final_val_loss"],
                     "max_logit": max((v for _, v in t["logit_absmax"]), default=None),
                     "log_z_final": t["log_z"][-1][1] if t["log_z"] else None,
                     "log_z_max": max((v for _, v in t["log_z"]), default=None), "trace": t})
    return rows


def ablation_table(scale: plan.Scale, runs: Runs) -> list[dict]:
    rows = []
    for name, kw in plan.ABLATIONS.items():
        losses = {v: runs.loss(plan.spec(scale, v, plan.ABLATION_LR, **kw)) for v in scale.embedding}
        rows.append({"ablation": name, "loss": losses})
    return rows


# ------------------------------------------------------------------------------------ markdown


def _lr(x) -> str:
    return "—" if x is None else f"{x:g}"


def headline_markdown(scale: plan.Scale, runs: Runs) -> str:
    """The setup, the lr bracket, the failure boundary and the seeded rule: results.md's first
    part, and the README's block."""
    bracket, bound, seeded = bracket_table(scale, runs), boundary_table(scale, runs), seed_table(scale, runs)
    lrs = [lr for lr in plan.LADDER if any(t["loss_by_lr"][lr] is not None for t in bracket)]
    winner, tied = choose_stable(seeded, runs.threshold)
    out = [
        f"Model: {scale.n_layer} layers, {scale.n_embd} wide, {scale.n_head} heads, byte-level, context {scale.seq_len}, "
        f"batch {scale.batch_size}; {scale.steps} steps of AdamW (warmup 10%, cosine to 0.1x, weight decay 0.1); "
        f"bundled corpus. Loss = final validation loss (nats per byte); a run \"trains\" if the training command "
        f"did not stop it as diverged, flagged no spike, and ends below {runs.threshold:.3f}, {MARGIN:g} under the "
        f"unigram loss (where a model that has stopped using context ends).",
        "",
        "**LR bracket** (grad clip 1.0, seed 0; each grid extended until its best lr is interior, * = best on the "
        "grid's edge; div = diverged):",
        "",
        "| variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best | LR sensitivity | max grad norm | max attn logit |",
        "|---|" + "---|" * (len(lrs) + 4),
    ]
    for t in bracket:
        cells = [_fmt(t["loss_by_lr"][lr]) for lr in lrs]
        best = f"{_fmt(t['best_loss'])} @ {_lr(t['best_lr'])}{'*' if t['edge'] else ''}"
        out.append(f"| {t['variant']} | " + " | ".join(cells) + f" | {best} | {_fmt(t['lr_sensitivity'])} | "
                   f"{t['max_grad_norm']:.2f} | {t['max_attn_logit']:.1f} |")

    def span(pair):
        top, fail = pair
        if top is None:
            return f"< {_lr(fail)}"
        return f"≥ {_lr(top)}" if fail is None else f"{_lr(top)} (fails at {_lr(fail)})"

    ref = next((r for r in bound if r["variant"] == "qk-norm"), None)
    out += ["", "**Failure boundary** (seed 0): the largest lr that still trains, then the lr above it that did not.", "",
            "| recipe | grad clip 1.0 | x qk-norm's | no clipping | x qk-norm's |", "|---|---|---|---|---|"]

    def ratio(r, clip):
        return r[clip][0] / ref[clip][0] if ref and r[clip][0] and ref[clip][0] else None

    for r in bound:
        out.append(f"| {r['variant']} | {span(r['clip'])} | {_fmt(ratio(r, 'clip'), 2)} | {span(r['noclip'])} | "
                   f"{_fmt(ratio(r, 'noclip'), 2)} |")
    out += ["", f"**Seeds** ({len(scale.seeds)} per cell: mean ± std; a run that did not train counts as "
            f"{runs.threshold:.3f}). Score = mean over these lrs; spread = std over seeds of each seed's mean.", "",
            "| recipe | " + " | ".join(f"lr {lr:g}" for lr in scale.seeded_lrs) + " | score ± spread | techniques |",
            "|---|" + "---|" * (len(scale.seeded_lrs) + 2)]
    for r in sorted(seeded, key=lambda r: r["score"]):
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in r["per_lr"].values()]
        out.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {r['score']:.3f} ± {r['spread']:.3f} | {r['techniques']} |")
    verdict = (f"Tied: {', '.join(tied)}. **The rule picks `{winner}`.**" if winner else
               "**No recipe trains at these lrs: the rule picks none.**")
    out += ["", "Rule for `stable`: the lowest score wins; recipes within the spread of the best tie, and a tie goes "
            f"to fewer techniques, then to the faster recipe. {verdict}"]
    return "\n".join(out)


def details_markdown(scale: plan.Scale, runs: Runs, init: list[dict]) -> str:
    out = [f"Gradients at init ({scale.init_layers} layers, {scale.init_width} wide): first / last layer gradient norm, "
           "and the std of the residual stream entering layer 1.", "",
           "| recipe | grad first / last | std into layer 1 |", "|---|---|---|"]
    out += [f"| {o['recipe']} | {o['grad_norm'][0] / o['grad_norm'][-1]:.2f} | {o['residual_std'][0]:.3f} |" for o in init]
    out += ["", f"**Depth** ({scale.deep_layers} layers against {scale.n_layer}; seed 0, grad clip 1.0):", "",
            "| recipe | layers | " + " | ".join(f"lr {lr:g}" for lr in plan.DEPTH_LRS) + " |",
            "|---|---|" + "---|" * len(plan.DEPTH_LRS)]
    out += [f"| {r['variant']} | {r['layers']} | " + " | ".join(_fmt(x) for x in r["loss_by_lr"].values()) + " |"
            for r in depth_table(scale, runs)]
    out += ["", f"**Output logits** (vanilla, lr {plan.OUTPUT_LOGIT_LR:g}, grad clip 1.0; max |output logit| and "
            "log Z = mean log-sum-exp of the logits, from the diagnostics' probe):", "",
            "| arm | loss | max \\|output logit\\| | log Z at the end | max log Z |", "|---|---|---|---|---|"]
    out += [f"| {r['arm']} | {_fmt(r['loss'])} | {_fmt(r['max_logit'], 1)} | {_fmt(r['log_z_final'], 2)} | "
            f"{_fmt(r['log_z_max'], 2)} |" for r in output_logit_table(scale, runs)]
    out += ["", f"**Embedding-fix ablations** (lr {plan.ABLATION_LR:g}, seed 0; BPE loss is per token, compare "
            "within its row):", "", "| change | " + " | ".join(scale.embedding) + " |", "|---|" + "---|" * len(scale.embedding)]
    out += [f"| {r['ablation']} | " + " | ".join(_fmt(r["loss"][v]) for v in scale.embedding) + " |"
            for r in ablation_table(scale, runs)]
    return "\n".join(out)


# ------------------------------------------------------------------------------------ files


def write_csv(scale: plan.Scale, runs: Runs) -> str:
    """One row per run of the plan (records it no longer asks for, e.g. of a recipe since
    changed, stay in runs.jsonl but not here)."""
    fields = ["key", "variant", "recipe", "lr", "seed", "n_layer", "grad_clip", "weight_decay", "tokenizer", "extra",
              "final_val_loss", "first_loss", "diverged", "spikes", "max_grad_norm", "max_attn_logit", "trained"]
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    specs = sorted(plan.plan(scale, runs.records, runs.verdict), key=lambda s: (s.variant, s.lr, s.key()))
    for s in specs:
        r = runs.get(s)
        x = r["result"]
        w.writerow({"key": r["key"], **{k: getattr(s, k) for k in fields[1:10] if k not in ("recipe", "extra")},
                    "recipe": s.recipe, "extra": json.dumps(dict(s.extra)), **{k: x[k] for k in fields[10:16]},
                    "trained": runs.verdict(r)})
    return f.getvalue()


def write(scale: plan.Scale, records: dict, threshold: float, out: Path, committed: bool) -> dict:
    from . import plots

    runs = Runs(records, threshold)
    init = [gradients_at_init(r, scale.init_layers, scale.init_width, scale.n_head)
            for r in tqdm([v for v in scale.variants if not plan.VARIANTS[v][1]], desc="gradients at init")]
    headline = headline_markdown(scale, runs)
    text = headline + "\n\n" + details_markdown(scale, runs, init) + "\n"
    for name, body in (("results.md", text), ("init.json", json.dumps(init, indent=1) + "\n"),
                       ("results.csv", write_csv(scale, runs))):
        atomic_write(out / name, lambda f, body=body: f.write(body.encode()))
    if committed:  # the full plan into the committed results: the README follows
        replace_block(README, "stability", "\n" + headline + "\n")
    paths = plots.plot_all(scale, runs, init, out)
    print(text)
    return {"stable": choose_stable(seed_table(scale, runs), threshold)[0], "markdown": text, "plots": paths}
