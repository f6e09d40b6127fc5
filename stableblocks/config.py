"""StableConfig: one dataclass for the model and every stabiliser it can switch on."""

from __future__ import annotations

import math
from dataclasses import dataclass

INITS = ("gpt2", "scaled", "wesar")
ACTIVATIONS = ("gelu", "gelu_tanh")


@dataclass
class StableConfig:
    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None  # MLP width (HF GPT2Config's name); None = 4 * n_embd
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu"  # exact GELU; "gelu_tanh" is GPT-2's original (HF's gelu_new)
    tie_embeddings: bool = True
    # Spike No More: multiply the token+position embedding by sqrt(n_embd) / LayerNorm it.
    embed_scale: bool = False
    embed_ln: bool = False
    # Per-head LayerNorm on q and k (QK-norm), or on q, k and v with no attention pre-norm
    # (QKV-norm, which supersedes QK-norm).
    qk_norm: bool = False
    qkv_norm: bool = False
    softcap: float | None = None  # attention-logit soft-cap: cap * tanh(s / cap)
    # QK-clip: after each optimizer step, heads whose max raw logit exceeded tau are rescaled to tau
    # (SPEC.md "QK-clip"; stableblocks.qk_clip). None: off.
    qk_clip: float | None = None
    post_norm: bool = False  # LayerNorm on the Proj and FC2 outputs before the residual add
    init: str = "gpt2"  # "gpt2" | "scaled" | "wesar"
    wesar_sigma: float = math.sqrt(4e-5)  # common std of every gated weight under init="wesar"
    low_rank: int | None = None  # MLRA: per-head q/k/v projections d -> low_rank -> D
    logit_softcap: float | None = None  # final-logit soft-cap (Gemma 2 uses 30)
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2) in the loss (Wortsman: 1e-4)
    embed_weight_decay: bool = True
    eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner < 1):
            raise ValueError(f"n_inner: expected a positive int or None (= 4 * n_embd), got {self.n_inner!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head: {self.n_head} does not divide n_embd = {self.n_embd}")
        if self.qk_norm and self.qkv_norm:
            raise ValueError("qk_norm and qkv_norm: set one; QKV-norm already normalises q and k")
        for name in ("softcap", "logit_softcap", "qk_clip"):
            cap = getattr(self, name)
            if cap is not None and not (isinstance(cap, (int, float)) and 0 < cap < math.inf):
                raise ValueError(f"{name}: expected a positive finite float or None, got {cap!r}")
        if self.init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {self.init!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        if self.low_rank is not None and not 1 <= self.low_rank <= self.head_dim:
            raise ValueError(f"low_rank: expected an int in [1, head width {self.head_dim}], got {self.low_rank!r}")
        if self.init == "wesar" and self.tie_embeddings:
            raise ValueError("tie_embeddings: init='wesar' gates an untied LM head; set tie_embeddings=False")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")
        if self.z_loss < 0:
            raise ValueError(f"z_loss: expected >= 0, got {self.z_loss!r}")

    @property
    def ffn_width(self) -> int:
        """The MLP's hidden width: n_inner, or GPT-2's 4 * n_embd."""
        return 4 * self.n_embd if self.n_inner is None else self.n_inner

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head
