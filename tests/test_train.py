"""The train command: loss falls, resume is exact, checkpoints are atomic, config files, guard, plots."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from stableblocks import checkpoint, data
from stableblocks.train import DataConfig, SpikeConfig, TrainConfig, WarmupCosine, main, parse_args, run


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("token-cache"))


def tiny(out_dir, cache_dir, **kw) -> TrainConfig:
    """A 2-layer, 32-wide byte-level model on the bundled corpus: a few seconds on a CPU."""
    cfg = TrainConfig(steps=16, batch_size=4, seq_len=32, lr=3e-3, warmup=4, eval_interval=8, eval_batches=2,
                      diag_interval=4, ckpt_interval=8, out_dir=str(out_dir), plot=False, progress=False,
                      data=DataConfig(cache_dir=cache_dir))
    cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd = 2, 2, 32
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_bundled_corpus():
    text = data.bundled_text()
    assert len(text) > 4_000_000 and "In the beginning God created the heaven and the earth." in text


@pytest.mark.slow
def test_train_loss_falls_and_writes_metrics_and_plots(tmp_path, cache_dir):
    summary = main(["--steps", "40", "--model.n-layer", "2", "--model.n-embd", "64", "--seq-len", "64",
                    "--batch-size", "8", "--eval-interval", "20", "--diag-interval", "10", "--no-progress",
                    "--data.cache-dir", cache_dir, "--out-dir", str(tmp_path)])
    metrics = rows(tmp_path)
    assert [r["step"] for r in metrics] == list(range(40)) and "val_loss" in metrics[-1]
    assert summary["final_loss"] < summary["first_loss"] - 1.0  # from ~ln(256) = 5.5 on bytes
    assert summary["best_val_loss"] < summary["first_loss"] - 1.0
    assert summary["spikes"] == 0 and summary["max_grad_norm"] > 0 and summary["run_dir"] == str(tmp_path)
    for name in ("loss", "grad_norm", "tev", "attn_logit", "output_norms"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert (tmp_path / "ckpt.pt").is_file() and json.loads((tmp_path / "summary.json").read_text())["steps"] == 40


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path, cache_dir, monkeypatch):
    full = run(tiny(tmp_path / "full", cache_dir))

    # A run killed after its step-8 checkpoint (during step 11), then resumed.
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def crashing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt("simulated kill")
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        run(tiny(tmp_path / "split", cache_dir))
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert checkpoint.load(tmp_path / "split" / "ckpt.pt")["step"] == 8
    resumed = run(tiny(tmp_path / "split", cache_dir, resume=True))

    a, b = rows(tmp_path / "full"), rows(tmp_path / "split")
    assert [r["step"] for r in b] == list(range(16))  # rows after the checkpoint were replaced
    for key in ("loss", "grad_norm", "val_loss", "tev_mean"):
        assert [r.get(key) for r in a] == [r.get(key) for r in b], key
    assert resumed["first_loss"] == full["first_loss"] and resumed["best_val_loss"] == full["best_val_loss"]
    sa, sb = checkpoint.load(tmp_path / "full" / "ckpt.pt"), checkpoint.load(tmp_path / "split" / "ckpt.pt")
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k


def test_a_resumed_run_may_be_longer(tmp_path, cache_dir):
    run(tiny(tmp_path, cache_dir, steps=6, ckpt_interval=6, lr=1e-3, warmup=2))
    run(tiny(tmp_path, cache_dir, steps=10, ckpt_interval=6, lr=2e-3, warmup=2, resume=True))
    schedule = WarmupCosine(2, 10, 0.1)  # the new run's schedule from step 6 on, at its peak lr
    assert [r["lr"] for r in rows(tmp_path)][6:] == pytest.approx([2e-3 * schedule(s) for s in range(6, 10)])
    assert [r["step"] for r in rows(tmp_path)] == list(range(10))


def test_resume_refuses_a_different_model(tmp_path, cache_dir):
    run(tiny(tmp_path, cache_dir, steps=8))
    cfg = tiny(tmp_path, cache_dir, steps=10, resume=True)
    cfg.model.n_embd = 64
    with pytest.raises(ValueError, match="n_embd"):
        run(cfg)


def test_checkpoint_write_is_atomic_under_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"step": 1, "w": torch.arange(4.0)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def dies_halfway(obj, f, *a, **k):  # writes part of the file, then the process "dies"
        real_save(obj, f, *a, **k)
        f.truncate(len(before) // 2)
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt("killed before the rename")))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"step": 3, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and checkpoint.load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary left behind
    checkpoint.save({"step": 4}, path)
    assert checkpoint.load(path)["step"] == 4


def test_config_file_then_command_line_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('recipe = "qk-norm"\nsteps = 7\n[model]\nn_layer = 3\n[spike]\nguard = "skip"\n')
    cfg = parse_args(["--config", str(toml), "--steps", "9", "--model.softcap", "30"])
    assert (cfg.recipe, cfg.steps, cfg.model.n_layer, cfg.model.softcap, cfg.spike.guard) == ("qk-norm", 9, 3, 30.0, "skip")
    # A run's config.json is a config file too.
    (tmp_path / "config.json").write_text(json.dumps({"steps": 5, "data": {"tokenizer": "gpt2"}}))
    assert parse_args(["--config", str(tmp_path / "config.json")]).data.tokenizer == "gpt2"
    toml.write_text("stepz = 3\n")
    with pytest.raises(ValueError, match="stepz"):
        parse_args(["--config", str(toml)])


@pytest.mark.parametrize("field, value, match", [
    ("batch_size", 0, "batch_size"), ("lr", -1.0, "lr"), ("grad_clip", -1.0, "grad_clip"), ("fsdp", True, "torchrun"),
])
def test_bad_settings_are_named(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        run(tiny(tmp_path, None, **{field: value}))


def _spike_at(monkeypatch, call: int):
    """Training batch number `call` becomes uniform random tokens: a real loss spike."""
    real = data.TokenStream.sample
    calls = {"n": 0}

    def sample(self, batch_size, seq_len, generator, rows=None):
        x, y = real(self, batch_size, seq_len, generator, rows)
        if batch_size > 1 and rows != slice(0, 0):  # training batches, not probes or skips
            calls["n"] += 1
            if calls["n"] == call:
                g = torch.Generator().manual_seed(0)
                return torch.randint(256, x.shape, generator=g), torch.randint(256, y.shape, generator=g)
        return x, y

    monkeypatch.setattr(data.TokenStream, "sample", sample)


def test_spike_guard_skips_the_update(tmp_path, cache_dir, monkeypatch):
    # eval_interval=0: the only evaluation is after the last step, so batch 31 is step 30.
    _spike_at(monkeypatch, 31)
    summary = run(tiny(tmp_path, cache_dir, steps=36, lr=1e-2, eval_interval=0, ckpt_interval=36,
                       spike=SpikeConfig(guard="skip", window=20, min_history=10)))
    assert summary["spike_steps"] == [30] == summary["skipped_steps"]
    assert rows(tmp_path)[30].get("skipped") is True and "loss" in rows(tmp_path)[30]["spike_on"]
    opt_state = checkpoint.load(tmp_path / "ckpt.pt")["optimizer"]["state"]
    assert {int(s["step"]) for s in opt_state.values()} == {35}  # 36 steps, one update skipped


def test_spike_guard_skips_a_nonfinite_gradient_under_a_finite_loss(tmp_path, cache_dir, monkeypatch):
    """The default watches the loss; a NaN gradient with a finite loss must not reach the weights."""
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def clip(params, max_norm, *a, **k):
        params = list(params)
        calls["n"] += 1
        if calls["n"] == 4:
            params[0].grad.fill_(float("nan"))
        return real(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    summary = run(tiny(tmp_path, cache_dir, steps=8, eval_interval=0, ckpt_interval=8, spike=SpikeConfig(guard="skip")))
    assert summary["skipped_steps"] == [3] and not summary["diverged"]
    assert math.isfinite(summary["final_loss"])
    weights = checkpoint.load(tmp_path / "ckpt.pt")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


@pytest.mark.slow
def test_spike_guard_rolls_back_to_the_checkpoint(tmp_path, cache_dir, monkeypatch):
    _spike_at(monkeypatch, 31)
    summary = run(tiny(tmp_path, cache_dir, steps=36, lr=1e-2, eval_interval=0, ckpt_interval=25,
                       spike=SpikeConfig(guard="rollback", window=20, min_history=10, skip_batches=3)))
    assert summary["rollbacks"] == 1 and summary["spike_steps"] == [30] and summary["steps"] == 36
    log = rows(tmp_path)
    assert [r["rollback_to"] for r in log if "rollback_to" in r] == [25]
    assert [r["step"] for r in log if "rollback_to" not in r] == list(range(30)) + list(range(25, 36))
    opt_state = checkpoint.load(tmp_path / "ckpt.pt")["optimizer"]["state"]
    assert {int(s["step"]) for s in opt_state.values()} == {36}  # every step of the kept path updated


def test_divergence_stops_the_run(tmp_path, cache_dir):
    summary = run(tiny(tmp_path, cache_dir, steps=30, lr=1e4, grad_clip=0.0, warmup=0, eval_interval=0, ckpt_interval=0))
    assert summary["diverged"] and summary["steps"] < 30


def test_bf16_autocast_trains(tmp_path, cache_dir):
    summary = run(tiny(tmp_path, cache_dir, steps=4, precision="bf16", ckpt_interval=0))
    assert summary["final_loss"] < summary["first_loss"]
