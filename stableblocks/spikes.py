"""Loss-spike detection: a step is a spike when its value exceeds a robust running statistic.

With the last `window` values (at least `min_history` of them), a value x is a spike when

    x > median + k * max(MAD, rel_floor * |median|)

MAD = median(|x_i - median|): one outlier barely moves it, so a spike does not hide the next
one, and a smoothly falling loss (always below its recent median) never trips it. The floor
keeps a nearly flat curve, whose MAD is ~0, from flagging noise. A non-finite value is always
a spike. Every value enters the window, so after a lasting jump the statistic catches up.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np


class SpikeDetector:
    def __init__(self, window: int = 100, k: float = 6.0, min_history: int = 20, rel_floor: float = 0.01):
        if window < 2 or not 2 <= min_history <= window:
            raise ValueError(f"spike window/min_history: expected 2 <= min_history <= window, got {min_history}, {window}")
        if not k > 0:
            raise ValueError(f"spike k: expected a positive threshold, got {k!r}")
        self.k, self.min_history, self.rel_floor = k, min_history, rel_floor
        self.values: deque[float] = deque(maxlen=window)

    def threshold(self) -> float | None:
        """The value above which the next step is a spike (None while the history is short)."""
        if len(self.values) < self.min_history:
            return None
        v = np.fromiter(self.values, dtype=np.float64)
        med = float(np.median(v))
        mad = float(np.median(np.abs(v - med)))
        return med + self.k * max(mad, self.rel_floor * abs(med))

    def update(self, x: float) -> bool:
        """Record x; True when it is a spike."""
        if not math.isfinite(x):
            return True  # never enters the window: it would poison the median
        limit = self.threshold()
        self.values.append(x)
        return limit is not None and x > limit

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self.values.extend(state["values"])


def find_spikes(values, **kwargs) -> list[int]:
    """Indices of the spikes in a whole curve (the detector run over it in order)."""
    detector = SpikeDetector(**kwargs)
    return [i for i, x in enumerate(values) if detector.update(float(x))]


# ---------------------------------------------------------------- divergence

MARGIN = 1.5  # see the README's Training section for how this default was chosen
SMOOTHING = 0.9  # EMA of the training loss: ~10 steps


def divergence_threshold(first_loss: float, vocab_size: int, margin: float = MARGIN) -> float:
    """The loss above which a run has diverged: the larger of its first loss and a uniform
    guess over the vocabulary (ln V), times `margin`."""
    return max(first_loss, math.log(vocab_size)) * margin


class DivergenceRule:
    """The one definition of "this run has diverged" (the trainer and the stability benchmark).

    A run has diverged when
    - its loss or gradient norm is non-finite and no guard skips the step ("non-finite");
    - the guard skipped or rolled back more than `max_skipped` consecutive steps ("guard");
    - its smoothed training loss stays above the threshold for `patience` consecutive steps ("loss");
    - a validation loss is above the threshold or non-finite ("val_loss").
    """

    def __init__(self, vocab_size: int, margin: float = MARGIN, patience: int = 20, max_skipped: int = 20):
        if not margin > 1:
            raise ValueError(f"diverge.margin: expected a float > 1, got {margin!r}")
        if patience < 1 or max_skipped < 1:
            raise ValueError(f"diverge.patience / diverge.max_skipped: expected ints >= 1, got {patience!r}, {max_skipped!r}")
        self.vocab_size, self.margin, self.patience, self.max_skipped = vocab_size, margin, patience, max_skipped
        self.threshold: float | None = None
        self.ema, self.ema_steps, self.above, self.skipped = 0.0, 0, 0, 0
        self.reason: str | None = None
        self.step: int | None = None

    @property
    def smoothed(self) -> float | None:
        return self.ema / (1 - SMOOTHING**self.ema_steps) if self.ema_steps else None

    def healthy(self) -> bool:
        """The smoothed loss is at or below the threshold (a state worth keeping)."""
        return self.reason is None and (self.smoothed is None or self.smoothed <= self.threshold)

    def _fire(self, step: int, reason: str) -> str:
        if self.reason is None:
            self.reason, self.step = reason, step
        return self.reason

    def train_step(self, step: int, loss: float, finite: bool, guarded: bool) -> str | None:
        """Record a training step (`guarded`: the guard skipped or rolled it back); the reason
        when the run has diverged."""
        if self.threshold is None and math.isfinite(loss):
            self.threshold = divergence_threshold(loss, self.vocab_size, self.margin)
        self.skipped = self.skipped + 1 if guarded else 0
        if not finite and not guarded:
            return self._fire(step, f"non-finite loss or gradient norm at step {step}")
        if self.skipped > self.max_skipped:
            return self._fire(step, f"the spike guard skipped or rolled back {self.skipped} consecutive steps (diverge.max_skipped {self.max_skipped})")
        if math.isfinite(loss):
            self.ema = SMOOTHING * self.ema + (1 - SMOOTHING) * loss
            self.ema_steps += 1
            self.above = self.above + 1 if self.smoothed > self.threshold else 0
            if self.above >= self.patience:
                return self._fire(step, f"smoothed training loss {self.smoothed:.4g} above the threshold {self.threshold:.4g} "
                                        f"for {self.above} consecutive steps")
        return None

    def validation(self, step: int, val_loss: float) -> str | None:
        if not math.isfinite(val_loss) or (self.threshold is not None and val_loss > self.threshold):
            return self._fire(step, f"validation loss {val_loss:.4g} above the threshold {self.threshold or math.nan:.4g} at step {step}")
        return None

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("threshold", "ema", "ema_steps", "above", "skipped")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
