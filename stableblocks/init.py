"""Weight initialisation, all in one place: "gpt2", "scaled" (Spike No More) and "wesar".

| init   | weight matrices and embeddings | attn c_proj, mlp c_proj (residual outputs) |
| gpt2   | N(0, 0.02)                     | N(0, 0.02 / sqrt(2N))                      |
| scaled | N(0, sqrt(2 / (5d)))           | N(0, sqrt(2 / (5d)) / sqrt(2N))            |
| wesar  | N(0, sigma), sigma^2 = 4e-5    | the same; each matrix is used as gate * W  |

Under WeSaR the gate of each matrix starts at sigma_req / sigma (see `wesar_sigma_req`), so the
effective weight has the std the matrix needs while every W shares one norm: with Adam the
update of W does not depend on the gate, so every matrix gets the same relative update size.
Biases start at 0, LayerNorm weights at 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .modules import LayerNorm, StableAttention, StableLinear, StableMLP


def base_std(cfg) -> float:
    return {"gpt2": 0.02, "scaled": math.sqrt(2 / (5 * cfg.n_embd)), "wesar": cfg.wesar_sigma}[cfg.init]


def wesar_sigma_req(cfg) -> dict[str, float]:
    """The std each gated matrix needs (WeSaR's table); keys name the matrix's role."""
    d, N = cfg.n_embd, cfg.n_layer
    return {
        "qkv": math.sqrt(1 / d),
        "attn_proj": math.sqrt(1 / (2 * N * d)),
        "fc": math.sqrt(1 / d),
        "mlp_proj": math.sqrt(1 / (N * cfg.ffn_width)),  # sqrt(2 / (8Nd)) at GPT-2's 4d
        "lm_head": math.sqrt(1 / d),
    }


def _roles(model: nn.Module) -> dict[StableLinear, str]:
    roles = {}
    for m in model.modules():
        if isinstance(m, StableAttention):
            roles[m.c_attn], roles[m.c_proj] = "qkv", "attn_proj"
        elif isinstance(m, StableMLP):
            roles[m.c_fc], roles[m.c_proj] = "fc", "mlp_proj"
    lm_head = getattr(model, "lm_head", None)
    if isinstance(lm_head, StableLinear):
        roles[lm_head] = "lm_head"
    return roles


@torch.no_grad()
def init_weights(model: nn.Module, cfg) -> None:
    """Initialise every parameter of a StableGPT (or of any tree of stableblocks modules)."""
    std = base_std(cfg)
    out_std = std if cfg.init == "wesar" else std / math.sqrt(2 * cfg.n_layer)
    sigma_req = wesar_sigma_req(cfg)
    roles = _roles(model)
    for m in model.modules():
        if isinstance(m, StableLinear):
            role = roles.get(m)
            nn.init.normal_(m.weight, 0.0, out_std if role in ("attn_proj", "mlp_proj") else std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            if m.gate is not None:
                m.gate.fill_(sigma_req[role] / std)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, LayerNorm):
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        if isinstance(m, StableAttention) and m.low_rank is not None:
            nn.init.normal_(m.c_attn_up, 0.0, std)
            if m.c_attn_up_bias is not None:
                nn.init.zeros_(m.c_attn_up_bias)


@torch.no_grad()
def fold_wesar_gates(model: nn.Module) -> nn.Module:
    """Fold every WeSaR gate into its weight (W <- gate * W) and drop the gates, for export."""
    for m in model.modules():
        if isinstance(m, StableLinear) and m.gate is not None:
            m.weight.copy_(m.effective_weight())
            m.gate = None
    return model
