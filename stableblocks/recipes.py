"""Named recipes: presets of StableConfig, one per row of the stability literature's comparisons."""

from __future__ import annotations

from dataclasses import fields

from .config import StableConfig

# Every technique field, so each recipe states all of them (overrides come on top).
_PLAIN = dict(
    embed_scale=False, embed_ln=False, qk_norm=False, qkv_norm=False, softcap=None, qk_clip=None,
    post_norm=False, init="scaled", tie_embeddings=True, embed_weight_decay=False,
)

# name -> (what it changes, source, StableConfig fields)
RECIPES: dict[str, tuple[str, str, dict]] = {
    "gpt2": ("GPT-2 baseline: N(0, 0.02) init, embeddings decayed", "GPT-2; nanoGPT",
             {**_PLAIN, "init": "gpt2", "embed_weight_decay": True}),
    "vanilla": ("scaled init sqrt(2/(5d)), no embedding fix", "Spike No More, 'Vanilla' baseline",
                dict(_PLAIN)),
    "scaled-embed": ("embeddings x sqrt(d)", "Spike No More, Scaled Embed",
                     {**_PLAIN, "embed_scale": True}),
    "embed-ln": ("LayerNorm on the embeddings", "Spike No More, Embed LN",
                 {**_PLAIN, "embed_ln": True}),
    "qk-norm": ("per-head LayerNorm on q and k", "Dehghani et al. 2023; Wortsman et al. 2023",
                {**_PLAIN, "qk_norm": True}),
    "qk-norm-cap": ("QK-norm + attention-logit soft-cap 50", "Rybakov et al. 2024, #3 QK_norm_cap",
                    {**_PLAIN, "qk_norm": True, "softcap": 50.0}),
    "qkv-norm": ("per-head LayerNorm on q, k, v; no attention pre-norm", "Rybakov et al. 2024, #2 QKV_norm",
                 {**_PLAIN, "qkv_norm": True}),
    "qk-fc-norm": ("QK-norm + LayerNorm after Proj and FC2", "Rybakov et al. 2024, #1 QK_FC_norm",
                   {**_PLAIN, "qk_norm": True, "post_norm": True}),
    "wesar": ("gated weights alpha * W, common small std, untied head", "Nishida et al. 2024 (WeSaR)",
              {**_PLAIN, "init": "wesar", "tie_embeddings": False}),
    "qk-clip": ("vanilla + QK-clip tau 100: heads whose max raw logit passed tau rescaled after each step",
                "Kimi K2 (MuonClip); Megatron-LM qk_clip", {**_PLAIN, "qk_clip": 100.0}),
}
# The project's default: the best loss among the recipes that keep attention logits bounded, at
# 0.6x vanilla's LR sensitivity (benchmarks/stability/results, README "What the stabilisers buy").
STABLE = "qk-norm"


def recipes() -> dict[str, str]:
    """Recipe name -> one line on what it changes and where it comes from."""
    out = {name: f"{what} ({source})" for name, (what, source, _) in RECIPES.items()}
    out["stable"] = f"the project's default: currently {STABLE}"
    return out


def recipe(name: str, **overrides) -> StableConfig:
    """A StableConfig for the named recipe, with any field overridden by keyword."""
    if name == "stable":
        name = STABLE
    if name not in RECIPES:
        raise ValueError(f"recipe: unknown name {name!r}; expected one of {sorted([*RECIPES, 'stable'])}")
    valid = {f.name for f in fields(StableConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"recipe overrides: unknown field(s) {unknown}; valid fields are {sorted(valid)}")
    return StableConfig(**{**RECIPES[name][2], **overrides})
