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
