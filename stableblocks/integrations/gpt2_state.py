"""GPT-2 state dicts in nanoGPT's names and layout: the common currency of the adapters.

nanoGPT names its weights as Hugging Face's GPT-2 does (transformer.wte, transformer.h.0.attn.c_attn,
...) but stores them as nn.Linear does, (out, in), like StableGPT. The nanoGPT adapter reads and
writes this form directly; the HF adapter transposes HF's Conv1D weights into it. Both depend on
the model, never the reverse.
"""

from __future__ import annotations

import re

import torch

from ..config import StableConfig
from ..model import StableGPT
from ..modules import StableLinear

# GPT-2 name prefix -> StableGPT name prefix. transformer.ln_embed is Embed LN in a patched HF
# model (plain GPT-2 has none).
PREFIXES = (
    ("transformer.wte.", "embed.wte."),
    ("transformer.wpe.", "embed.wpe."),
    ("transformer.ln_embed.", "embed.ln."),
    ("transformer.h.", "blocks."),
    ("transformer.ln_f.", "ln_f."),
    ("lm_head.", "lm_head."),
)
# Parameters a recipe may add to a plain GPT-2; they start at identity when missing from the source.
_ADDED = re.compile(r"^embed\.ln\.|\.(q|k|v)_norm\.|\.post_norm_(attn|mlp)\.|\.gate$")
# The causal-mask buffer nanoGPT (without flash attention) and old HF versions keep in their state dicts.
_MASK_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")


def _rename(key: str, pairs) -> str | None:
    for src, dst in pairs:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def stable_name(gpt2_key: str) -> str | None:
    """StableGPT's name for a GPT-2 state-dict key (None when StableGPT has no such prefix)."""
    return _rename(gpt2_key, PREFIXES)


def gpt2_name(stable_key: str) -> str | None:
    """GPT-2's name for a StableGPT state-dict key."""
    return _rename(stable_key, [(dst, src) for src, dst in PREFIXES])


def plain_gpt2_gaps(cfg: StableConfig) -> list[str]:
    """The stabilisers of `cfg` that a plain GPT-2 has no place for (WeSaR gates fold into W)."""
    gaps = [name for name in ("embed_ln", "qk_norm", "qkv_norm", "post_norm") if getattr(cfg, name)]
    gaps += [name for name in ("softcap", "low_rank", "logit_softcap") if getattr(cfg, name) is not None]
    if cfg.embed_scale and cfg.tie_embeddings:
        gaps.append("embed_scale with a tied LM head")  # the head reads wte unscaled: cannot fold
    return gaps


def gpt2_state_dict(model: StableGPT, fold_gates: bool = False) -> dict:
    """`model`'s state dict under GPT-2's names (nn.Linear layout); with fold_gates, WeSaR gates
    folded into their weights and dropped."""
    state = model.state_dict()
    if fold_gates:
        state = {k: v for k, v in state.items() if not k.endswith(".gate")}
        for name, m in model.named_modules():
            if isinstance(m, StableLinear) and m.gate is not None:
                state[f"{name}.weight"] = m.effective_weight().detach()
    return {gpt2_name(k): v for k, v in state.items()}


@torch.no_grad()
def load_gpt2_state_dict(state: dict, cfg: StableConfig) -> StableGPT:
    """A StableGPT(cfg) holding a GPT-2 state dict in nanoGPT's names and layout.

    Parameters the recipe adds start at identity (norm weights 1, biases 0, WeSaR gates 1), and an
    untied LM head the source lacks starts as a copy of the token embedding, so with recipe "gpt2"
    (or "wesar") the model computes what the source did. QKV-norm drops the attention pre-norm.
    """
    model = StableGPT(cfg)
    own = model.state_dict()
    mapped, unknown = {}, []
    for key, value in state.items():
        if _MASK_BUFFER.search(key):
            continue
        new = stable_name(key)
        if new is None:
            unknown.append(key)
        else:
            mapped[new] = value
    if cfg.low_rank is not None and not any(k.endswith(".attn.c_attn_up") for k in mapped):
        raise ValueError("low_rank: MLRA factors the QKV projection; weights without that factoring cannot fill it")
    unexpected = unknown + [k for k in mapped if k not in own and not (cfg.qkv_norm and ".ln_1." in k)]
    if unexpected:
        raise ValueError(f"state dict: keys this {cfg.n_layer}-layer StableGPT has no place for: {unexpected[:8]}")
    mapped = {k: v for k, v in mapped.items() if k in own}
    wrong = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in mapped.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"state dict: shapes differ from the config's (source -> StableGPT): {wrong[:4]}")
    if cfg.tie_embeddings and "lm_head.weight" in mapped:
        head = mapped.pop("lm_head.weight")
        if not torch.equal(head, mapped.get("embed.wte.weight", head)):
            raise ValueError("tie_embeddings: the source's LM head differs from its token embedding; pass tie_embeddings=False")
    missing = [k for k in own if k not in mapped and k != "lm_head.weight" and not _ADDED.search(k)]
    if missing:
        raise ValueError(f"state dict: missing weights {missing[:8]}")
    model.load_state_dict(mapped, strict=False)
    for name, m in model.named_modules():
        if isinstance(m, StableLinear) and m.gate is not None and f"{name}.gate" not in mapped:
            m.gate.fill_(1.0)
    if not cfg.tie_embeddings and "lm_head.weight" not in mapped:  # an untied head the source lacks
        model.lm_head.weight.copy_(model.embed.wte.weight)
    return model
