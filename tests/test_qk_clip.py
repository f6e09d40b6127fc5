"""QK-clip (SPEC.md "QK-clip"): exact at lr 0, bounds the logits a high learning rate grows, and
keeps DDP replicas identical."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import stableblocks as sb
from stableblocks.qk_clip import QKClip, apply_qk_clip, record_max_logits

TINY = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=64)


def _model(recipe: str, **kw) -> sb.StableGPT:
    torch.manual_seed(0)
    return sb.StableGPT(sb.recipe(recipe, **{**TINY, **kw}))


def _batch(seed: int = 1, B: int = 4, T: int = 24) -> torch.Tensor:
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def _spread_heads(model: sb.StableGPT) -> None:
    """Make each head's logits a different size, so a tau between them clips some heads only."""
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn
            if attn.q_norm is not None:
                attn.q_norm.weight.mul_(6.0)
                attn.k_norm.weight.mul_(6.0)
                continue
            H, D = attn.n_head, attn.head_dim
            grow = torch.linspace(1.0, 12.0, H).repeat_interleave(D)
            if attn.low_rank is None:
                attn.c_attn.weight[: H * D].mul_(grow[:, None])
                attn.c_attn.weight[H * D: 2 * H * D].mul_(grow[:, None])
            else:
                attn.c_attn_up[:2].mul_(torch.linspace(1.0, 12.0, H)[None, :, None, None])


def _max_logits(model, x) -> dict[str, torch.Tensor]:
    with torch.no_grad(), record_max_logits(model) as got:
        model(x)
    return got


# recipe, overrides: what the rule reaches through in each
VARIANTS = {
    "vanilla": ("vanilla", {}),
    "wesar gates": ("wesar", {}),
    "MLRA": ("vanilla", dict(low_rank=8)),
    "MLRA + wesar": ("wesar", dict(low_rank=8)),
    "qk-norm": ("qk-norm", {}),
    "qkv-norm + cap": ("qkv-norm", dict(softcap=5.0)),
}


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_at_lr_0_the_recomputed_max_logit_is_min_of_S_and_tau(variant, backend_name):
    recipe, overrides = VARIANTS[variant]
    sb.set_backend(backend_name)
    # One layer: a clipped layer changes what every later layer sees, so exactness is per layer,
    # for the inputs S was measured on.
    model = _model(recipe, n_layer=1, **overrides)
    _spread_heads(model)
    x = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with record_max_logits(model) as S:
        _, loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
    opt.step()
    everything = torch.cat(list(S.values()))
    tau = float(everything.quantile(0.6))  # some heads above, some below
    assert (everything > tau).any() and (everything < tau).any()
    result = apply_qk_clip(model, tau, S)
    after = _max_logits(model, x)
    shared_norm = model.blocks[0].attn.q_norm is not None
    for name, s in S.items():
        assert torch.equal(result.max_logit[name], s)
        want = torch.minimum(s, torch.tensor(tau))
        if shared_norm:  # one factor for the layer: its largest head lands on tau, the others below
            want = s * torch.where(s > tau, tau / s, 1.0).min()
        torch.testing.assert_close(after[name], want, rtol=2e-5, atol=1e-5)
        torch.testing.assert_close(result.factor[name], torch.where(s > tau, tau / s, 1.0))


def test_gates_and_v_are_left_alone():
    model = _model("wesar")
    _spread_heads(model)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_attn.bias.normal_()
    x = _batch()
    S = _max_logits(model, x)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_qk_clip(model, float(torch.cat(list(S.values())).min()) / 2, S)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"blocks.{i}.attn.c_attn.{w}" for i in range(2) for w in ("weight", "bias")}
    d = TINY["n_embd"]
    for i in range(2):  # v's rows unchanged
        for w in ("weight", "bias"):
            now = getattr(model.blocks[i].attn.c_attn, w)
            assert torch.equal(now[2 * d:], before[f"blocks.{i}.attn.c_attn.{w}"][2 * d:])


def test_heads_below_tau_are_untouched_bitwise():
    model = _model("vanilla")
    x = _batch()
    S = _max_logits(model, x)
    before = [p.detach().clone() for p in model.parameters()]
    result = apply_qk_clip(model, 1e4, S)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(g, torch.ones_like(g)) for g in result.factor.values())


def test_clear_errors():
    model = _model("vanilla")
    with pytest.raises(ValueError, match="max_logits: nothing recorded for"):
        apply_qk_clip(model, 100.0, {})
    with pytest.raises(ValueError, match="tau: expected a positive finite float"):
        QKClip(model, tau=0.0)
    with pytest.raises(ValueError, match="has no StableAttention"):
        QKClip(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="qk_clip: expected a positive finite float or None"):
        sb.recipe("vanilla", qk_clip=-1.0)
    assert sb.recipe("qk-norm", qk_clip=50.0).qk_clip == 50.0  # usable with any recipe


def test_recording_takes_the_max_over_micro_batches_and_nests():
    model = _model("vanilla")
    _spread_heads(model)
    a, b = _batch(1), _batch(2) * 0 + 5  # a constant batch has other logits than a random one
    clip = QKClip(model, tau=1e9)
    for x in (a, b):
        with clip.recording():
            model(x)
            _max_logits(model, _batch(3))  # a nested probe leaves the step's record alone
    sa, sb_ = _max_logits(model, a), _max_logits(model, b)
    result = clip.apply()
    for name in sa:
        assert torch.equal(result.max_logit[name], torch.maximum(sa[name], sb_[name]))
    with pytest.raises(ValueError, match="nothing recorded"):
        clip.apply()  # apply() starts the next step's record afresh


def _train(recipe: str, steps: int, lr: float = 0.1) -> list[float]:
    """A short high-lr AdamW run on a repeating sequence; the step's peak max logit."""
    torch.manual_seed(0)
    cfg = sb.recipe(recipe, vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)
    model = sb.StableGPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    clip = QKClip(model, cfg.qk_clip) if cfg.qk_clip else None
    g = torch.Generator().manual_seed(1)
    base = torch.randint(0, 64, (64,), generator=g)
    peaks = []
    for _ in range(steps):
        x = torch.stack([torch.roll(base, int(s))[:32] for s in torch.randint(0, 64, (8,), generator=g)])
        with clip.recording() if clip else record_max_logits(model) as S:
            _, loss = model(x, torch.roll(x, -1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if clip:
            S = clip.apply().max_logit
        peaks.append(max(s.max().item() for s in S.values()))
    return peaks


def test_high_lr_vanilla_logits_grow_past_1e3_and_qk_clip_keeps_them_below_2_tau():
    vanilla, clipped = _train("vanilla", 50), _train("qk-clip", 50)
    assert max(vanilla) > 1e3, max(vanilla)
    tau = sb.recipe("qk-clip").qk_clip
    assert max(clipped) < 2 * tau, max(clipped)


_DDP_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    import stableblocks as sb
    from stableblocks.qk_clip import QKClip

    rank, world, store, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = sb.recipe("qk-clip", vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)
    model = sb.StableGPT(cfg)
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    clip = QKClip(model, cfg.qk_clip)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data: its own max logits
    acted = 0
    for _ in range(30):
        x = torch.randint(0, 8, (4, 32), generator=g)
        with clip.recording():
            _, loss = model(x, torch.roll(x, -1, 1))
            loss.backward()
        opt.step()
        opt.zero_grad()
        acted += int(any((f < 1).any() for f in clip.apply().factor.values()))
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()}
    torch.save({"params": full, "acted": acted}, store + f".rank{rank}")
    dist.destroy_process_group()
""")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_keep_replicas_bitwise_equal(tmp_path, mode):
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    store = str(tmp_path / "store")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", STABLEBLOCKS_BACKEND="reference")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", store, mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-3000:]
    r0, r1 = (torch.load(f"{store}.rank{r}") for r in range(2))
    assert r0["acted"] > 0 and r0["acted"] == r1["acted"]  # the clip acted, on the same steps
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), name
