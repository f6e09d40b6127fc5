"""Training data: the bundled corpus and random windows of token ids."""

from __future__ import annotations

import lzma
from importlib import resources

import numpy as np
import torch

CORPUS = "kjv.txt.xz"  # the King James Bible (public domain), from Debian's bible-kjv


def bundled_text() -> str:
    return lzma.decompress(resources.files("stableblocks.corpus").joinpath(CORPUS).read_bytes()).decode("utf-8")


def byte_tokens(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)


def split(tokens: np.ndarray, val_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    n = int(len(tokens) * (1 - val_fraction))
    return tokens[:n], tokens[n:]


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs (B, T) and next-token targets (B, T), int64."""
    starts = torch.randint(len(tokens) - block_size - 1, (batch_size,), generator=generator).numpy()
    rows = np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64)
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]
