"""QK-clip inside the training command: recorded over the step's micro-batches, applied after the update."""

from __future__ import annotations

import json
import math
import os

from test_train import cache_dir, tiny  # noqa: F401

from stableblocks.train import run


def _rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def _peak_logit(rows):
    return max(max(r["attn_logit_max"]) for r in rows if "attn_logit_max" in r)


def test_qk_clip_keeps_the_logits_near_tau_where_vanilla_grows(tmp_path, cache_dir):  # noqa: F811
    tau = 4.0
    peaks = {}
    for name, clip in (("vanilla", None), ("qk-clip", tau)):
        cfg = tiny(tmp_path / name, cache_dir, recipe="vanilla", steps=30, lr=0.1, grad_clip=0.0, diag_interval=1,
                   eval_interval=0, ckpt_interval=0, grad_accum=2)
        cfg.diverge.margin = 1e9  # the rule is not under test here
        cfg.model.qk_clip = clip
        summary = run(cfg)
        assert math.isfinite(summary["final_loss"])
        rows = _rows(tmp_path / name)
        peaks[name] = _peak_logit(rows)
        if clip is not None:
            # Heads past tau were clipped after their step, and the step's record is what the kernel saw.
            assert sum(r["qk_clip_heads"] for r in rows) > 0
            assert all(r["qk_clip_max_logit"] < 2 * tau for r in rows), [r["qk_clip_max_logit"] for r in rows]
        else:
            assert not any("qk_clip_heads" in r for r in rows)
    assert peaks["vanilla"] > 2 * tau, peaks
    assert peaks["qk-clip"] < 2 * tau, peaks
