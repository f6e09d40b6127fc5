"""The stability benchmark's measurements."""

import math

import pytest

from benchmarks.stability.analysis import gradients_at_init, largest_stable_lr, lr_sensitivity


def test_lr_sensitivity_on_a_hand_made_table():
    # Diverged (nan) and worse-than-init runs both count as the init loss, 5.5.
    losses = {1e-3: 3.0, 3e-3: 2.5, 1e-2: 2.0, 3e-2: math.nan, 1e-1: 9.0}
    assert lr_sensitivity(losses, loss_init=5.5) == pytest.approx((3.0 + 2.5 + 2.0 + 5.5 + 5.5) / 5 - 2.0)
    assert lr_sensitivity({1e-3: 2.0, 1e-2: 2.0}, loss_init=5.5) == 0.0
    # Divergence is the training command's verdict (a nan loss), not a second rule here.
    assert largest_stable_lr({1e-3: 3.0, 1e-2: 2.0, 3e-2: math.nan}) == 1e-2
    assert largest_stable_lr({1e-3: math.inf}) is None


def test_embedding_fixes_flatten_gradients_at_init():
    """Spike No More: with scaled init, shallow layers get much larger gradients than deep ones;
    Scaled Embed and Embed LN bring the residual stream entering layer 1 to std ~1 and flatten it."""
    out = {r: gradients_at_init(r, n_layer=8, n_embd=64, n_head=2, block_size=32, batch_size=4)
           for r in ("vanilla", "scaled-embed", "embed-ln")}
    ratio = {r: o["grad_norm"][0] / o["grad_norm"][-1] for r, o in out.items()}
    assert ratio["vanilla"] > 1.5 * max(ratio["scaled-embed"], ratio["embed-ln"])
    assert out["vanilla"]["residual_std"][0] < 0.2
    assert out["embed-ln"]["residual_std"][0] == pytest.approx(1.0, abs=0.05)
    # sqrt(2 * 2/5) ~ 0.89 for the token + position sum under the scaled init.
    assert out["scaled-embed"]["residual_std"][0] == pytest.approx(math.sqrt(4 / 5), abs=0.08)


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path):
    from benchmarks.stability.__main__ import QUICK, main

    out = main(["--quick", "--out", str(tmp_path), "--workers", "1"])
    assert len(out["rows"]) == len(QUICK.variants) * len(QUICK.lrs) * len(QUICK.seeds)
    assert not any(r["diverged"] for r in out["rows"])  # the divergence rule's default spares healthy runs
    for t in out["table"]:
        assert t["best_loss"] < math.log(256)  # every variant learned something
    for name in ("results.csv", "results.md", "init.json", "loss_vs_lr.png", "grad_norm_traces.png",
                 "grad_norm_at_init.png", "attn_logit_growth.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    md = (tmp_path / "results.md").read_text()
    assert all(f"| {v} |" in md for v in QUICK.variants)
