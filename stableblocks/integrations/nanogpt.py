"""nanoGPT checkpoints <-> StableGPT.

nanoGPT names its weights as Hugging Face's GPT-2 does (transformer.wte, transformer.h.0.attn.c_attn,
...) but stores them as nn.Linear does, (out, in), like StableGPT. So a GPT-2 state dict in
nanoGPT's names and layout is the common currency: the HF conversions in hf.py transpose HF's
Conv1D weights into it and then load it here.
"""

from __future__ import annotations

import os
import re

import torch

from ..config import StableConfig
from ..model import StableGPT
from ..modules import StableLinear
from ..recipes import recipe as make_recipe

# nanoGPT / HF name prefix -> StableGPT name prefix. transformer.ln_embed is Embed LN in a patched
# HF model (plain GPT-2 has none).
_PREFIXES = (
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


def plain_gpt2_gaps(cfg: StableConfig) -> list[str]:
    """The stabilisers of `cfg` that a plain GPT-2 has no place for (WeSaR gates fold into W)."""
    gaps = [name for name in ("embed_ln", "qk_norm", "qkv_norm", "post_norm") if getattr(cfg, name)]
    gaps += [name for name in ("softcap", "low_rank", "logit_softcap") if getattr(cfg, name) is not None]
    if cfg.embed_scale and cfg.tie_embeddings:
        gaps.append("embed_scale with a tied LM head")  # the head reads wte unscaled: cannot fold
    return gaps


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
        new = _rename(key, _PREFIXES)
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


def nanogpt_config(state: dict, model_args: dict | None = None, recipe: str = "gpt2", **overrides) -> StableConfig:
    """The StableConfig for a nanoGPT state dict: shapes from the weights, n_head and dropout from
    nanoGPT's model_args (or overrides), stabilisers from the recipe."""
    args = dict(model_args or {})
    if "transformer.wte.weight" not in state:
        raise ValueError("checkpoint: no 'transformer.wte.weight'; expected a nanoGPT GPT state dict")
    vocab_size, n_embd = state["transformer.wte.weight"].shape
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.h.")}
    found = dict(vocab_size=vocab_size, n_embd=n_embd, block_size=state["transformer.wpe.weight"].shape[0],
                 n_layer=max(layers) + 1 if layers else 0, bias="transformer.ln_f.bias" in state)
    for name, value in found.items():
        for source, given in (("model_args", args), ("overrides", overrides)):
            if name in given and given[name] != value:
                raise ValueError(f"{name}: {source} say {given[name]!r}, the weights have {value!r}")
    n_head = overrides.pop("n_head", args.get("n_head"))
    if n_head is None:
        raise ValueError("n_head: a bare state dict does not record the number of heads; pass n_head=")
    head = state.get("lm_head.weight")
    tied = head is None or torch.equal(head, state["transformer.wte.weight"])
    fields = {**found, "n_head": n_head, "dropout": args.get("dropout", 0.0),
              "tie_embeddings": make_recipe(recipe).tie_embeddings and tied}
    return make_recipe(recipe, **{**fields, **overrides})


def from_nanogpt(checkpoint, recipe: str = "gpt2", **overrides) -> StableGPT:
    """A StableGPT from nanoGPT: a ckpt.pt path, the dict torch.load gives for it, or a bare state dict.

    nanoGPT's GPT uses exact GELU, biases per its `bias` flag and a tied head; with the default
    recipe "gpt2" the StableGPT computes the same logits. Another recipe adds its stabilisers at
    identity (e.g. recipe="qk-norm" to continue training with QK-norm).
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint: expected a path, a nanoGPT checkpoint dict or a state dict, got {type(checkpoint).__name__}")
    if isinstance(checkpoint.get("model"), dict):
        state, model_args = checkpoint["model"], checkpoint.get("model_args")
    else:
        state, model_args = checkpoint, None
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # saved from a torch.compile'd model
    return load_gpt2_state_dict(state, nanogpt_config(state, model_args, recipe, **overrides))


def to_nanogpt(model: StableGPT) -> dict:
    """A state dict nanoGPT's GPT loads (its keys, nn.Linear layout, WeSaR gates folded in)."""
    cfg = model.config
    gaps = plain_gpt2_gaps(cfg)
    gaps += ["activation='gelu_tanh' (nanoGPT uses exact GELU)"] if cfg.activation != "gelu" else []
    gaps += ["tie_embeddings=False (nanoGPT ties its head)"] if not cfg.tie_embeddings else []
    if gaps:
        raise ValueError(f"model: nanoGPT's GPT has no {', '.join(gaps)}")
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".gate")}
    for name, m in model.named_modules():
        if isinstance(m, StableLinear) and m.gate is not None:
            state[f"{name}.weight"] = m.effective_weight().detach()
    back = [(dst, src) for src, dst in _PREFIXES]
    return {_rename(k, back): v for k, v in state.items()}
