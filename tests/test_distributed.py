"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 follow the 1-process run, and their
checkpoints resume in 1 process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from stableblocks import checkpoint
from stableblocks.train import WarmupCosine, run

from test_train import cache_dir, rows, tiny  # noqa: F401  (cache_dir is a fixture)

pytestmark = pytest.mark.slow

ARGS = ["--steps", "6", "--batch-size", "4", "--grad-accum", "2", "--seq-len", "32", "--model.n-layer", "2", "--model.n-head", "2",
        "--model.n-embd", "32", "--lr", "3e-3", "--warmup", "4", "--eval-interval", "3", "--eval-batches", "2",
        "--diag-interval", "2", "--ckpt-interval", "6", "--no-plot", "--no-progress"]


def torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> None:
    """`torchrun --standalone --nproc_per_node nproc -m stableblocks.train args`, killed (with its
    workers) if it outlives `timeout` seconds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", STABLEBLOCKS_BACKEND="reference")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "stableblocks.train", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s: {' '.join(cmd)}")
    assert proc.returncode == 0, out.decode()[-4000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir):  # noqa: F811
    """The 1-process reference run (6 steps of 2 micro-steps, diagnostics every 2 steps, checkpoint at the end)."""
    out = tmp_path_factory.mktemp("single")
    cfg = tiny(out, cache_dir, steps=6, grad_accum=2, eval_interval=3, diag_interval=2, ckpt_interval=6)
    run(cfg)
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_follow_one_and_resume_in_one(tmp_path, cache_dir, single, mode):  # noqa: F811
    out = tmp_path / mode
    torchrun([*ARGS, "--data.cache-dir", cache_dir, "--out-dir", str(out), *(["--fsdp"] if mode == "fsdp" else [])])
    info = json.loads((out / "run.json").read_text())
    assert info["world_size"] == 2
    one, two = rows(single), rows(out)
    assert [r["step"] for r in two] == list(range(6))
    for key in ("loss", "grad_norm", "val_loss", "tev_mean"):
        a = torch.tensor([r[key] for r in one if key in r], dtype=torch.float64)
        b = torch.tensor([r[key] for r in two if key in r], dtype=torch.float64)
        assert len(a) == len(b) > 0 and torch.allclose(a, b, rtol=1e-5, atol=1e-6), (key, a, b)
    assert all(len(r["attn_logit_max"]) == 2 for r in two if "attn_logit_max" in r)

    # The 2-process checkpoint is whole (not a shard) and equals the 1-process one.
    ca, cb = checkpoint.load(single / "ckpt.pt"), checkpoint.load(out / "ckpt.pt")
    assert cb["world_size"] == 2 and cb["step"] == 6
    for k, v in ca["model"].items():
        if k.endswith("k_norm.bias"):
            # q . (k + b) shifts a query's logits by a constant: the softmax ignores it, so this
            # gradient is 0 in exact arithmetic and Adam turns its float noise into lr-sized steps.
            continue
        assert cb["model"][k].shape == v.shape and torch.allclose(cb["model"][k], v, rtol=1e-5, atol=1e-6), k

    # It resumes in 1 process and continues as the 1-process run's own checkpoint does.
    resumed = {}
    for name, src in (("one", single), ("two", out)):
        dst = tmp_path / f"resume-{name}"
        dst.mkdir()
        for f in ("ckpt.pt", "metrics.jsonl"):
            (dst / f).write_bytes((src / f).read_bytes())
        run(tiny(dst, cache_dir, steps=9, grad_accum=2, eval_interval=3, diag_interval=2, ckpt_interval=0, resume=True))
        resumed[name] = torch.tensor([r["loss"] for r in rows(dst)][6:], dtype=torch.float64)
    assert len(resumed["two"]) == 3 and torch.allclose(resumed["one"], resumed["two"], rtol=1e-4), resumed
    lrs = [r["lr"] for r in rows(dst)][6:]  # the resumed run follows its own, longer schedule
    assert lrs == pytest.approx([3e-3 * WarmupCosine(4, 9, 0.1)(s) for s in range(6, 9)])
