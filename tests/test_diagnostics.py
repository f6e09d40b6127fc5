"""Diagnostics read what SPEC.md section 6 says, never change training, and spikes are found."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import stableblocks as sb
from stableblocks import diagnostics
from stableblocks.spikes import SpikeDetector, find_spikes
from stableblocks.train import run

from test_train import cache_dir, rows, tiny  # noqa: F401  (cache_dir is a fixture)


def smooth_loss(n: int, seed: int = 0) -> np.ndarray:
    """A pre-training-like curve: fast then slow decay, with 1% step-to-step noise."""
    rng = np.random.default_rng(seed)
    steps = np.arange(n)
    return (2.5 + 3.0 * np.exp(-steps / 150)) * (1 + 0.01 * rng.standard_normal(n))


def test_spike_detector_finds_known_spikes_and_nothing_else():
    curve = smooth_loss(2000)
    for seed in range(5):
        assert find_spikes(smooth_loss(2000, seed)) == [], seed  # no false positive on a smooth curve
    spiky = curve.copy()
    known = [300, 301, 900, 1500]  # a two-step +30% spike in the fast decay, +15% later, then x3
    spiky[300] *= 1.3
    spiky[301] *= 1.3
    spiky[900] *= 1.15
    spiky[1500] *= 3
    assert find_spikes(spiky) == known
    spiky[1700] = float("nan")
    assert find_spikes(spiky) == known + [1700]


def test_spike_detector_waits_for_history_and_catches_up_with_a_lasting_jump():
    det = SpikeDetector(window=20, k=6, min_history=10)
    assert [det.update(v) for v in [5.0] * 5 + [50.0]] == [False] * 6  # not enough history yet
    det = SpikeDetector(window=20, k=6, min_history=10)
    flags = [det.update(v) for v in [2.0] * 20 + [4.0] * 30]
    assert flags[20] and not any(flags[:20]) and not any(flags[31:])  # the new level becomes normal
    with pytest.raises(ValueError, match="min_history"):
        SpikeDetector(window=10, min_history=20)


def make_model(recipe: str, **kw) -> sb.StableGPT:
    torch.manual_seed(0)
    return sb.StableGPT(sb.recipe(recipe, vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, **kw))


def test_probe_reads_the_raw_logit_before_the_cap():
    model = make_model("qk-norm-cap", softcap=5.0)
    with torch.no_grad():
        for block in model.blocks:  # make the logits large enough for the cap to bite
            block.attn.q_norm.weight.fill_(4.0)
            block.attn.k_norm.weight.fill_(4.0)
    idx = torch.randint(64, (1, 16), generator=torch.Generator().manual_seed(1))
    got = diagnostics.probe(model, idx)

    # Independently: the block inputs by running the model step by step, then q k^T / sqrt(D).
    x = model.embed(idx)
    expected, qkv, proj, fc2 = [], [], [], []
    for block in model.blocks:
        a_in = block.ln_1(x)
        attn = block.attn
        q, k, v = attn.qkv(a_in)
        qn = torch.nn.functional.layer_norm(q, (16,), attn.q_norm.weight, attn.q_norm.bias, 1e-5)
        kn = torch.nn.functional.layer_norm(k, (16,), attn.k_norm.weight, attn.k_norm.bias, 1e-5)
        s = torch.einsum("bthd,bshd->bhts", qn, kn) / math.sqrt(16)
        expected.append(s.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf")).max().item())
        qkv.append(attn.c_attn(a_in).norm(dim=-1).mean().item())
        a = attn(a_in)
        proj.append(a.norm(dim=-1).mean().item())
        h = x + a
        m = block.mlp(block.ln_2(h))
        fc2.append(m.norm(dim=-1).mean().item())
        x = h + m
    assert min(got["attn_logit_max"]) > 5.0  # above the cap: read before it
    for key, want in (("attn_logit_max", expected), ("qkv_out_norm", qkv), ("proj_out_norm", proj), ("fc2_out_norm", fc2)):
        assert got[key] == pytest.approx(want, rel=1e-5), key
    logits = model(idx)[0]
    assert got["log_z"] == pytest.approx(torch.logsumexp(logits, -1).mean().item(), rel=1e-5)
    assert got["logit_mean"] == pytest.approx(logits.mean().item(), rel=1e-4, abs=1e-7)
    assert got["logit_absmax"] == pytest.approx(logits.abs().max().item(), rel=1e-5)
    row_std = model.embed.wte.weight.std(dim=1, correction=0)
    assert got["tev_mean"] == pytest.approx(row_std.mean().item()) and got["tev_std"] == pytest.approx(row_std.std(correction=0).item())
    assert not model.embed.wte._forward_hooks and all(not b.attn._forward_hooks for b in model.blocks)  # removed


def test_layer_grad_norms_add_up_to_the_global_norm():
    model = make_model("wesar", tie_embeddings=False)
    idx = torch.randint(64, (2, 16))
    model(idx, idx)[1].backward()
    layers = diagnostics.grad_norms(model)
    assert set(layers) == {"embed", "block0", "block1", "head"}
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
    assert math.sqrt(sum(v * v for v in layers.values())) == pytest.approx(total, rel=1e-5)


def test_update_ratio_is_the_relative_change_of_each_matrix():
    model = make_model("gpt2")
    ratio = diagnostics.UpdateRatio(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ratio.snapshot()
    with torch.no_grad():
        model.blocks[0].mlp.c_fc.weight.mul_(1.5)
    got = ratio.ratios()
    assert got["blocks.0.mlp.c_fc.weight"] == pytest.approx(0.5) and got["blocks.1.mlp.c_fc.weight"] == 0.0
    assert set(got) == {n for n, p in before.items() if p.dim() >= 2}


def test_diagnostics_are_logged_finite_and_do_not_change_training(tmp_path, cache_dir):  # noqa: F811
    run(tiny(tmp_path / "with", cache_dir, steps=8, diag_interval=1, ckpt_interval=0))
    run(tiny(tmp_path / "without", cache_dir, steps=8, diag_interval=0, ckpt_interval=0))
    a, b = rows(tmp_path / "with"), rows(tmp_path / "without")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    for r in a:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tev_mean", "tev_std", "logit_mean", "logit_absmax", "log_z"):
            assert math.isfinite(r[key]), key
        for key in ("attn_logit_max", "qkv_out_norm", "proj_out_norm", "fc2_out_norm"):
            assert len(r[key]) == 2 and all(math.isfinite(v) and v > 0 for v in r[key]), key
        assert set(r["grad_norm_layers"]) == {"embed", "block0", "block1", "head"}
        assert len(r["update_ratio"]) == 10 and all(0 < v < 1 for v in r["update_ratio"].values())
    assert "tev_mean" not in b[0]
