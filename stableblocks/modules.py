"""Drop-in GPT-2 building blocks with the stabilisers switched on by a StableConfig.

Each module calls the functional ops of stableblocks.kernels, which run the fused Triton
kernels on CUDA and the plain-PyTorch references on CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .config import StableConfig
from .kernels import fused_add_norm, fused_attention, fused_embedding, layer_norm
from .kernels.fused_attention import reference as attention_reference


class LayerNorm(nn.Module):
    def __init__(self, width: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)

    @property
    def params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weight, self.bias


def _norm_params(norm: LayerNorm | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return (None, None) if norm is None else norm.params


def _gate_rows(weight: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """(out_features, 1): each gate repeated over its slice of the output rows."""
    return gate.repeat_interleave(weight.shape[0] // gate.numel()).unsqueeze(1)


class _GatedLinear(torch.autograd.Function):
    """F.linear(x, gate * W, b) that saves only x for backward.

    Autograd through `gate * W` would save the gated copy of W (one per matrix per layer, as big
    as the weights); here it is formed in forward and again in backward, and never kept. The
    gradients are the materialising formula's: with G = dy^T x the gradient of gate * W,
    dW = gate * G and d gate = sum over its slice of G * W.
    """

    @staticmethod
    def forward(ctx, x, weight, gate, bias):
        ctx.save_for_backward(x, weight, gate)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight * _gate_rows(weight, gate), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, gate = ctx.saved_tensors
        rows = _gate_rows(weight, gate)
        need_x, need_w, need_gate, need_bias = ctx.needs_input_grad
        dx = dw = dgate = dbias = None
        # Under autocast the forward's matmul ran in dy's dtype: the backward's do too.
        if need_x:
            dx = (dy @ (weight * rows).to(dy.dtype)).to(x.dtype)
        dy2 = dy.reshape(-1, dy.shape[-1])
        if need_w or need_gate:
            g = (dy2.t() @ x.reshape(-1, x.shape[-1]).to(dy.dtype)).to(weight.dtype)
            dw = g * rows if need_w else None
            dgate = (g * weight).sum(1).view(gate.numel(), -1).sum(1).to(gate.dtype) if need_gate else None
        if need_bias:
            dbias = dy2.sum(0).to(ctx.bias_dtype)
        return dx, dw, dgate, dbias


class StableLinear(nn.Linear):
    """nn.Linear whose weight may be used as gate * W (WeSaR): one trainable scalar per slice.

    A fused QKV projection carries three gates, one per q/k/v slice of its output rows. The gated
    weight is never saved for backward (see _GatedLinear): a WeSaR block keeps the activations
    of a plain one.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gates: int = 0):
        super().__init__(in_features, out_features, bias)
        self.gate = nn.Parameter(torch.ones(gates)) if gates else None

    def effective_weight(self) -> torch.Tensor:
        if self.gate is None:
            return self.weight
        return self.weight * _gate_rows(self.weight, self.gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return F.linear(x, self.weight, self.bias)
        return _GatedLinear.apply(x, self.weight, self.gate, self.bias)


class StableEmbedding(nn.Module):
    """Token + position embedding, with Scaled Embed (x sqrt(d)) and/or Embed LN."""

    def __init__(self, cfg: StableConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.ln = LayerNorm(cfg.n_embd, cfg.bias, cfg.eps) if cfg.embed_ln else None
        self.scale = math.sqrt(cfg.n_embd) if cfg.embed_scale else 1.0
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        w, b = _norm_params(self.ln)
        eps = self.ln.eps if self.ln is not None else 1e-5
        return self.drop(fused_embedding(idx, self.wte.weight, self.wpe.weight, scale=self.scale, ln_weight=w, ln_bias=b, eps=eps))


class StableAttention(nn.Module):
    """Causal self-attention with optional QK-norm / QKV-norm, soft-cap, MLRA and WeSaR gates."""

    def __init__(self, cfg: StableConfig):
        super().__init__()
        d, H, D = cfg.n_embd, cfg.n_head, cfg.head_dim
        gated = cfg.init == "wesar"
        self.n_head, self.head_dim, self.low_rank = H, D, cfg.low_rank
        if cfg.low_rank is None:
            self.c_attn = StableLinear(d, 3 * d, cfg.bias, gates=3 if gated else 0)
        else:
            # MLRA as this project reads it: each head's q/k/v map d -> r -> D.
            self.c_attn = StableLinear(d, 3 * H * cfg.low_rank, False, gates=3 if gated else 0)
            # nn.Linear's default scale, so the module works standalone; init_weights sets the recipe's.
            bound = 1.0 / math.sqrt(cfg.low_rank)
            self.c_attn_up = nn.Parameter(torch.empty(3, H, cfg.low_rank, D).uniform_(-bound, bound))
            self.c_attn_up_bias = nn.Parameter(torch.zeros(3, H, D)) if cfg.bias else None
        self.c_proj = StableLinear(d, d, cfg.bias, gates=1 if gated else 0)
        normed = cfg.qk_norm or cfg.qkv_norm
        self.q_norm = LayerNorm(D, cfg.bias, cfg.eps) if normed else None
        self.k_norm = LayerNorm(D, cfg.bias, cfg.eps) if normed else None
        self.v_norm = LayerNorm(D, cfg.bias, cfg.eps) if cfg.qkv_norm else None
        self.softcap = cfg.softcap
        self.eps = cfg.eps
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        # Per-head max raw logit of the forwards run while recording (stableblocks.qk_clip.MaxLogits).
        self.record_max_logit = False
        self.max_logit: torch.Tensor | None = None

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, T, H, D) views of the projection's output (before any norm)."""
        qkv = self.c_attn(x)
        if self.low_rank is None:
            qkv = rearrange(qkv, "b t (s h d) -> b t s h d", s=3, h=self.n_head)
        else:
            qkv = rearrange(qkv, "b t (s h r) -> b t s h r", s=3, h=self.n_head)
            qkv = torch.einsum("btshr,shrd->btshd", qkv, self.c_attn_up)
            if self.c_attn_up_bias is not None:
                qkv = qkv + self.c_attn_up_bias
        return qkv.unbind(2)

    def norms(self) -> dict:
        return {
            name: (None if m is None else m.params)
            for name, m in (("q_norm", self.q_norm), ("k_norm", self.k_norm), ("v_norm", self.v_norm))
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        dropout = self.training and self.dropout > 0
        record = self.record_max_logit
        if dropout:
            # The fused kernel has no dropout: attention dropout takes the reference path.
            y = attention_reference(q, k, v, softcap=self.softcap, eps=self.eps, dropout_p=self.dropout,
                                    return_max_logit=record, **self.norms())
        else:
            y = fused_attention(q, k, v, softcap=self.softcap, eps=self.eps, return_max_logit=record, **self.norms())
        if record:
            y, m = y
            self.max_logit = m if self.max_logit is None else torch.maximum(self.max_logit, m)
        return self.resid_drop(self.c_proj(rearrange(y, "b t h d -> b t (h d)")))


class StableMLP(nn.Module):
    def __init__(self, cfg: StableConfig):
        super().__init__()
        gates = 1 if cfg.init == "wesar" else 0
        self.c_fc = StableLinear(cfg.n_embd, cfg.ffn_width, cfg.bias, gates=gates)
        self.c_proj = StableLinear(cfg.ffn_width, cfg.n_embd, cfg.bias, gates=gates)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class StableBlock(nn.Module):
    """Pre-norm transformer block; the residual adds, post-norms and the MLP's pre-norm are fused.

    x -> h = x + post_norm_attn(attn(ln_1(x)))      (ln_1 absent under QKV-norm)
      -> out = h + post_norm_mlp(mlp(ln_2(h)))      (post norms only when post_norm is set)
    """

    def __init__(self, cfg: StableConfig):
        super().__init__()
        self.ln_1 = None if cfg.qkv_norm else LayerNorm(cfg.n_embd, cfg.bias, cfg.eps)
        self.attn = StableAttention(cfg)
        self.post_norm_attn = LayerNorm(cfg.n_embd, cfg.bias, cfg.eps) if cfg.post_norm else None
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias, cfg.eps)
        self.mlp = StableMLP(cfg)
        self.post_norm_mlp = LayerNorm(cfg.n_embd, cfg.bias, cfg.eps) if cfg.post_norm else None
        self.eps = cfg.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(x if self.ln_1 is None else self.ln_1(x))
        x, h = fused_add_norm(x, a, *_norm_params(self.post_norm_attn), next_weight=self.ln_2.weight, next_bias=self.ln_2.bias, eps=self.eps)
        return fused_add_norm(x, self.mlp(h), *_norm_params(self.post_norm_mlp), eps=self.eps)
