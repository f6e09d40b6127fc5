"""Faults injected into a training run by step number (so a resumed run meets the same ones):
a NaN gradient, a real loss spike (a batch of uniform random tokens), a kill -9 during a save."""

from __future__ import annotations

import os
import signal

import torch

from stableblocks import checkpoint
from stableblocks.trainer import Trainer


def install(setattr_, nan_at=(), spike_at=(), kill_saving=None, skip_at=()):
    """Patch Trainer (and checkpoint.save) through `setattr_` (monkeypatch.setattr, or setattr)."""
    real_step, real_guard, real_save = Trainer.step, Trainer.guard, checkpoint.save

    def step(self):
        if self.step_no in spike_at:
            stream, real_sample = self.corpus.train, type(self.corpus.train).sample

            def sample(*a, **k):
                x, y = real_sample(stream, *a, **k)
                g = torch.Generator().manual_seed(0)
                return torch.randint(256, x.shape, generator=g), torch.randint(256, y.shape, generator=g)

            stream.sample = sample
            try:
                row = real_step(self)
            finally:
                del stream.sample
        else:
            row = real_step(self)
        if self.step_no in nan_at:
            next(self.core.parameters()).grad.fill_(float("nan"))
            row["grad_norm"] = float("nan")
        return row

    def guard(self, row):
        action, spike = real_guard(self, row)
        if self.step_no in skip_at and action == "update":
            return "skip", spike
        return action, spike

    def save(state, path):
        if kill_saving is not None and state.get("step") == kill_saving:
            def dies(obj, f, *a, **k):  # half a file, then kill -9
                f.write(b"\x50\x4b\x03\x04" + b"\0" * 4096)
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            setattr_(torch, "save", dies)
        real_save(state, path)

    setattr_(Trainer, "step", step)
    setattr_(Trainer, "guard", guard)
    setattr_(checkpoint, "save", save)
