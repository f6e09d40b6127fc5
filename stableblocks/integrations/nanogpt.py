"""nanoGPT checkpoints <-> StableGPT.

nanoGPT stores a GPT-2 state dict in the form gpt2_state.py reads and writes (GPT-2's names,
nn.Linear's layout), so this adapter only adds nanoGPT's checkpoint layout and model_args.
"""

from __future__ import annotations

import os

import torch

from ..config import StableConfig
from ..model import StableGPT
from ..recipes import recipe as make_recipe
from .gpt2_state import gpt2_state_dict, load_gpt2_state_dict, plain_gpt2_gaps


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
    gaps += [f"n_inner={cfg.n_inner} (nanoGPT's MLP is 4 * n_embd wide)"] if cfg.ffn_width != 4 * cfg.n_embd else []
    if gaps:
        raise ValueError(f"model: nanoGPT's GPT has no {', '.join(gaps)}")
    return gpt2_state_dict(model, fold_gates=True)
