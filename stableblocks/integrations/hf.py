"""Hugging Face transformers GPT-2, patched in place: `patch_gpt2(model, recipe)`.

The patch keeps HF's module names (transformer.wte, transformer.h.0.attn.c_attn, ...), swaps each
GPT2Block for a StableBlock and ln_f for a stableblocks LayerNorm, adds transformer.ln_embed under
Embed LN, and replaces the instance's GPT2Model.forward: HF's adds the position embeddings itself,
so the fused embedding (token + position, scale, LayerNorm in one op) needs a forward of its own.
That forward calls the blocks, so the block calling conventions of transformers 4.x (tuples) and
5.x (tensors) never meet a StableBlock; both versions call GPT2Model alike.

Weights: HF's Conv1D stores (in, out), StableLinear (an nn.Linear) stores (out, in). A patched
model saves under HF's names with nn.Linear's layout plus `config.stableblocks` (the StableConfig):
reload it with `load_patched(dir)`, or `unpatch_gpt2` it first for a plain GPT-2 checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, fields, replace
from types import MethodType

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

try:
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions, CausalLMOutputWithCrossAttentions
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("stableblocks.integrations.hf needs transformers: pip install 'stableblocks[hf]'") from e

from ..config import StableConfig
from ..init import fold_wesar_gates, init_weights
from ..kernels import fused_embedding, fused_linear_cross_entropy
from ..model import StableGPT
from ..modules import LayerNorm, StableBlock, StableLinear
from ..recipes import recipe as make_recipe
from .gpt2_state import gpt2_state_dict, load_gpt2_state_dict, plain_gpt2_gaps

# HF activation_function -> StableConfig.activation ("gelu_new" is GPT-2's tanh form).
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_SHAPE = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_inner", "bias")
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _body(model) -> GPT2Model:
    if isinstance(model, GPT2LMHeadModel):
        return model.transformer
    if isinstance(model, GPT2Model):
        return model
    raise ValueError(f"model: expected a transformers GPT2LMHeadModel or GPT2Model, got {type(model).__name__}")


def is_patched(model) -> bool:
    return isinstance(getattr(_body(model), "stable_config", None), StableConfig)


def _patched_config(model) -> StableConfig:
    if not is_patched(model):
        raise ValueError("model: not patched by stableblocks (call patch_gpt2 first)")
    return _body(model).stable_config


def _hf_fields(hf: GPT2Config) -> dict:
    """The StableConfig fields a GPT2Config fixes; ValueError for what StableBlock cannot express."""
    problems = []
    if getattr(hf, "add_cross_attention", False):
        problems.append("add_cross_attention=True")
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if not getattr(hf, "scale_attn_weights", True):
        problems.append("scale_attn_weights=False")
    if hf.activation_function not in ACTIVATIONS:
        problems.append(f"activation_function={hf.activation_function!r} (supported: {sorted(ACTIVATIONS)})")
    if problems:
        raise ValueError(f"model.config: stableblocks' GPT-2 blocks have no {', '.join(problems)}")
    out = dict(vocab_size=hf.vocab_size, block_size=hf.n_positions, n_layer=hf.n_layer, n_head=hf.n_head,
               n_embd=hf.n_embd, n_inner=None if hf.n_inner in (None, 4 * hf.n_embd) else hf.n_inner, bias=True, activation=ACTIVATIONS[hf.activation_function], eps=hf.layer_norm_epsilon)
    drops = {hf.resid_pdrop, hf.embd_pdrop, hf.attn_pdrop}
    if len(drops) == 1:
        out["dropout"] = drops.pop()
    return out


def stable_config(hf_config: GPT2Config, recipe: str | StableConfig = "stable", **overrides) -> StableConfig:
    """The StableConfig a patch of a GPT-2 with this HF config uses.

    With a recipe name: shape, activation, LayerNorm eps, dropout and head tying come from the HF
    config, the stabilisers from the recipe, then the overrides. With a StableConfig: its fields
    (the shape must match the model's).
    """
    hf = _hf_fields(hf_config)
    if isinstance(recipe, StableConfig):
        valid = {f.name for f in fields(StableConfig)}
        if set(overrides) - valid:
            raise ValueError(f"overrides: unknown field(s) {sorted(set(overrides) - valid)}")
        cfg = StableConfig(**{**asdict(recipe), **overrides})
    else:
        if "dropout" not in hf and "dropout" not in overrides:
            raise ValueError(f"dropout: the model's resid_pdrop, embd_pdrop and attn_pdrop differ "
                             f"({hf_config.resid_pdrop}, {hf_config.embd_pdrop}, {hf_config.attn_pdrop}); "
                             "stableblocks uses one dropout: pass dropout=")
        tied = make_recipe(recipe).tie_embeddings and getattr(hf_config, "tie_word_embeddings", True)
        cfg = make_recipe(recipe, **{**hf, "tie_embeddings": tied, **overrides})
    for name in _SHAPE:
        if getattr(cfg, name) != hf[name]:
            raise ValueError(f"{name}: the model has {hf[name]!r}, the config asks for {getattr(cfg, name)!r}; a patch keeps the model's shape")
    if cfg.logit_softcap is not None or cfg.z_loss:
        raise ValueError("logit_softcap, z_loss: the HF patch leaves the LM head and the loss to transformers; use StableGPT for them")
    return cfg


@torch.no_grad()
def _copy_block(hf: nn.Module, stable: StableBlock, to_stable: bool = True) -> None:
    """Copy weights between a GPT2Block and a StableBlock; Conv1D's (in, out) is nn.Linear's transpose."""
    pairs = [(stable.ln_2, hf.ln_2, False), (stable.attn.c_attn, hf.attn.c_attn, True),
             (stable.attn.c_proj, hf.attn.c_proj, True), (stable.mlp.c_fc, hf.mlp.c_fc, True),
             (stable.mlp.c_proj, hf.mlp.c_proj, True)]
    if stable.ln_1 is not None:  # QKV-norm has no attention pre-norm
        pairs.append((stable.ln_1, hf.ln_1, False))
    for mine, theirs, conv in pairs:
        src, dst = (theirs, mine) if to_stable else (mine, theirs)
        dst.weight.copy_(src.weight.t() if conv else src.weight)
        dst.bias.copy_(src.bias)


def _sync_hf_config(model, cfg: StableConfig | None) -> None:
    """Keep model.config telling the truth about the patched model (and record the StableConfig)."""
    hf = model.config
    if cfg is not None:
        if ACTIVATIONS[hf.activation_function] != cfg.activation:
            hf.activation_function = "gelu_new" if cfg.activation == "gelu_tanh" else "gelu"
        hf.resid_pdrop = hf.embd_pdrop = hf.attn_pdrop = cfg.dropout
        hf.layer_norm_epsilon = cfg.eps
        if isinstance(model, GPT2LMHeadModel):
            hf.tie_word_embeddings = cfg.tie_embeddings
        hf.stableblocks = asdict(cfg)
    elif hasattr(hf, "stableblocks"):
        del hf.stableblocks
    # A patched model keeps no KV cache: generate() recomputes the prefix at every step.
    hf.use_cache = cfg is None
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = cfg is None


def patch_gpt2(model, recipe: str | StableConfig = "stable", reinit: bool = False, **overrides):
    """Swap a GPT2LMHeadModel's (or GPT2Model's) embedding, blocks and final norm for stableblocks
    modules configured by `recipe` (a name or a StableConfig) plus `overrides`, in place.

    reinit=False keeps every existing weight, and what the recipe adds starts at identity (norm
    weights 1, biases 0, WeSaR gates 1): with recipe "gpt2" the logits do not change. reinit=True
    applies the recipe's initialisation (pre-training from scratch). Returns the model.
    """
    body = _body(model)
    if is_patched(model):
        raise ValueError("model: already patched by stableblocks; call unpatch_gpt2(model) first")
    cfg = stable_config(model.config, recipe, **overrides)
    if cfg.low_rank is not None and not reinit:
        raise ValueError("low_rank: MLRA reshapes the QKV projection, so the existing weights cannot be kept; pass reinit=True")
    ref = body.wte.weight
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and cfg.tie_embeddings and lm_head.weight is not ref:
        raise ValueError("tie_embeddings: the model's LM head is not tied to its token embedding; pass tie_embeddings=False")
    with torch.no_grad():
        blocks = nn.ModuleList(StableBlock(cfg) for _ in body.h)
        ln_f = LayerNorm(cfg.n_embd, True, cfg.eps)
        if not reinit:
            for hf_block, block in zip(body.h, blocks):
                _copy_block(hf_block, block)
            ln_f.load_state_dict(body.ln_f.state_dict())
        new = {"h": blocks, "ln_f": ln_f, "ln_embed": LayerNorm(cfg.n_embd, True, cfg.eps) if cfg.embed_ln else None}
        if lm_head is not None and not cfg.tie_embeddings:
            new_head = StableLinear(cfg.n_embd, cfg.vocab_size, bias=False, gates=1 if cfg.init == "wesar" else 0)
            new_head.weight.copy_(lm_head.weight)  # a copy of wte when HF tied them
            new["lm_head"] = new_head
    for name, module in new.items():
        if module is not None:
            module.to(ref.device, ref.dtype).train(model.training)
        setattr(model if name == "lm_head" else body, name, module)
    body.drop.p = cfg.dropout
    body.stable_config = cfg
    body.forward = MethodType(_patched_forward, body)
    if getattr(model, "lm_head", None) is not None:
        model.forward = MethodType(_patched_lm_forward, model)
    model.resize_token_embeddings = MethodType(_patched_resize, model)
    _sync_hf_config(model, cfg)
    if reinit:
        init_weights(model, cfg)
    return model


def _check_padding(mask: torch.Tensor, batch: int, length: int) -> None:
    if mask.dim() != 2 or tuple(mask.shape) != (batch, length):
        raise ValueError(f"attention_mask: expected a (batch, seq) padding mask of shape {(batch, length)}, got {tuple(mask.shape)}")
    # Causal attention never looks to the right, so with right padding (each row ones, then zeros)
    # every real token's output is exact without the mask; left padding or holes would need it.
    ok = (mask[:, 1:] <= mask[:, :-1]).all()
    msg = ("attention_mask: a stableblocks-patched GPT-2 supports right padding only (each row ones, then "
           "zeros); pad on the right (tokenizer.padding_side = 'right') or pack sequences")
    if torch.compiler.is_compiling():
        torch._assert_async(ok, msg)  # no graph break; raises when the step runs
    elif not ok:
        raise ValueError(msg)


# Arguments transformers' GPT2LMHeadModel passes through to the body that the LM head, not the
# body, honours (5.x forwards its **kwargs to both).
_PASSED_THROUGH = ("num_items_in_batch",)


def _patched_forward(self, input_ids=None, *, attention_mask=None, position_ids=None, inputs_embeds=None,
                     output_hidden_states=None, return_dict=None, cache_position=None,
                     cache=None, past_key_values=None, use_cache=None, token_type_ids=None, head_mask=None,
                     encoder_hidden_states=None, encoder_attention_mask=None, output_attentions=None, **kwargs):
    """GPT2Model.forward of a patched model. It takes the argument names of transformers 4.57 and
    5.x and refuses by name every one it cannot honour (a KV cache under any of its names, token
    types, head masks, cross-attention, attention weights, anything unknown): never a silent
    forward that ignores an argument."""
    unsupported = {
        "cache / past_key_values / use_cache (no KV cache; generate() recomputes the prefix)":
            cache is not None or past_key_values is not None or bool(use_cache),
        "encoder_hidden_states / encoder_attention_mask (no cross-attention)":
            encoder_hidden_states is not None or encoder_attention_mask is not None,
        "token_type_ids": token_type_ids is not None,
        "head_mask": head_mask is not None,
        "output_attentions (the fused attention keeps no weights)": bool(output_attentions),
    }
    unsupported.update({f"{name} (unknown argument)": True for name in kwargs if name not in _PASSED_THROUGH})
    if any(unsupported.values()):
        raise ValueError(f"{', '.join(k for k, v in unsupported.items() if v)}: not supported by a stableblocks-patched GPT-2")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("input_ids, inputs_embeds: pass exactly one")
    if position_ids is None and cache_position is not None:  # 4.57's positions of the given tokens
        position_ids = cache_position.unsqueeze(0)
    cfg = self.stable_config
    batch, length = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
    if attention_mask is not None:
        _check_padding(attention_mask, batch, length)
    scale = math.sqrt(cfg.n_embd) if cfg.embed_scale else 1.0
    if inputs_embeds is None and position_ids is None:
        ln = (None, None) if self.ln_embed is None else self.ln_embed.params
        x = fused_embedding(input_ids, self.wte.weight, self.wpe.weight, scale=scale, ln_weight=ln[0], ln_bias=ln[1], eps=cfg.eps)
    else:  # given token embeddings, or positions other than 0..T-1 (generate() passes them): unfused
        tokens = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        x = (tokens + (self.wpe.weight[:length] if position_ids is None else self.wpe(position_ids))) * scale
        x = x if self.ln_embed is None else self.ln_embed(x)
    x = self.drop(x)
    hidden = ()
    for block in self.h:
        hidden += (x,) if output_hidden_states else ()
        x = checkpoint(block, x, use_reentrant=False) if self.gradient_checkpointing and self.training else block(x)
    x = self.ln_f(x)
    hidden += (x,) if output_hidden_states else ()
    out = BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=x, hidden_states=hidden or None)
    return out.to_tuple() if return_dict is False else out


def _patched_lm_forward(self, input_ids=None, *, labels=None, num_items_in_batch=None, return_dict=None, **kwargs):
    """GPT2LMHeadModel.forward of a patched model. With labels, the loss comes from
    fused_linear_cross_entropy under HF's rules (labels shifted by one token, -100 ignored, the sum
    divided by num_items_in_batch when the Trainer passes it) and, in training mode, the logits are
    not formed (None). Without labels, transformers' own forward."""
    if labels is None:
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        return type(self).forward(self, input_ids, return_dict=return_dict, **kwargs, **extra)
    out = self.transformer(input_ids, **kwargs)
    hidden = out.last_hidden_state
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].to(hidden.device)
    head = self.lm_head  # HF's nn.Linear when tied, a StableLinear (maybe gated) when not
    weight = head.effective_weight() if isinstance(head, StableLinear) else head.weight
    loss = fused_linear_cross_entropy(hidden, weight, targets, head.bias,
                                      ignore_index=-100, reduction="mean" if num_items_in_batch is None else "sum")
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    logits = None if self.training else self.lm_head(hidden)
    result = CausalLMOutputWithCrossAttentions(loss=loss, logits=logits, hidden_states=out.hidden_states)
    return result.to_tuple() if return_dict is False else result


def _patched_resize(self, *args, **kwargs):
    """transformers' resize_token_embeddings, then the recorded StableConfig follows the new vocabulary
    (save_pretrained writes it; load_patched rebuilds the model from it). An untied head stays a
    StableLinear: transformers rebuilds it as a plain nn.Linear, which would drop its WeSaR gate."""
    head = getattr(self, "lm_head", None)
    out = type(self).resize_token_embeddings(self, *args, **kwargs)
    resized = getattr(self, "lm_head", None)
    if isinstance(head, StableLinear) and not isinstance(resized, StableLinear):
        kept = StableLinear(resized.in_features, resized.out_features, bias=False)
        kept.weight, kept.gate = resized.weight, head.gate
        self.lm_head = kept.train(resized.training)
    body = _body(self)
    body.stable_config = replace(body.stable_config, vocab_size=body.wte.weight.shape[0])
    _sync_hf_config(self, body.stable_config)
    return out


def unpatch_gpt2(model):
    """Back to a plain transformers GPT-2, in place: WeSaR gates (and Scaled Embed, when the head
    is untied) fold into the weights. ValueError when a stabiliser has no place in plain GPT-2."""
    body, cfg = _body(model), _patched_config(model)
    gaps = plain_gpt2_gaps(cfg)
    if gaps:
        raise ValueError(f"model: plain GPT-2 has no {', '.join(gaps)}; use from_hf(model) for a StableGPT, or keep it patched")
    ref = body.wte.weight
    with torch.no_grad():
        fold_wesar_gates(model)
        if cfg.embed_scale:
            body.wte.weight.mul_(math.sqrt(cfg.n_embd))
            body.wpe.weight.mul_(math.sqrt(cfg.n_embd))
        blocks = nn.ModuleList(GPT2Block(model.config, layer_idx=i) for i in range(cfg.n_layer))
        for block, hf_block in zip(body.h, blocks):
            _copy_block(hf_block, block, to_stable=False)
        ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.eps)
        ln_f.load_state_dict(body.ln_f.state_dict())
        new = {"h": blocks, "ln_f": ln_f}
        if isinstance(getattr(model, "lm_head", None), StableLinear):
            head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
            head.weight.copy_(model.lm_head.weight)
            new["lm_head"] = head
    for name, module in new.items():
        setattr(model if name == "lm_head" else body, name, module.to(ref.device, ref.dtype).train(model.training))
    del body.forward, body.stable_config, body.ln_embed, model.resize_token_embeddings
    if "forward" in vars(model):
        del model.forward
    _sync_hf_config(model, None)
    return model


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups for a patched model, StableGPT's policy: decay weight matrices only (not biases,
    norms or WeSaR gates; embeddings only when the recipe decays them). HF Trainer's default groups
    only spare nn.LayerNorm and names with "bias"/"norm", so pass these:
    `Trainer(..., optimizers=(torch.optim.AdamW(param_groups(model, 0.1), lr=...), None))`."""
    from ..model import param_groups as groups

    cfg, body = _patched_config(model), _body(model)
    return groups(model, (body.wte.weight, body.wpe.weight), cfg.embed_weight_decay, weight_decay)


def _read_state_dict(path: str) -> dict:
    from safetensors.torch import load_file

    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(os.path.join(path, shard)).items()}
    legacy = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise ValueError(f"path: no model.safetensors(.index.json) or pytorch_model.bin in {path}")


def load_patched(path: str):
    """Reload a patched model saved with save_pretrained: build the GPT-2 from config.json, re-patch
    it with the recorded StableConfig, load the weights (strict). Returns it in eval mode."""
    config = GPT2Config.from_pretrained(path)
    if not isinstance(getattr(config, "stableblocks", None), dict):
        raise ValueError(f"path: {path}/config.json has no 'stableblocks' entry, so it is not a patched model; use from_pretrained")
    model = (GPT2Model if config.architectures == ["GPT2Model"] else GPT2LMHeadModel)(config)
    # transformers' resize_token_embeddings keeps config.vocab_size current: it is the vocabulary.
    patch_gpt2(model, StableConfig(**{**config.stableblocks, "vocab_size": config.vocab_size}))
    result = model.load_state_dict(_read_state_dict(path), strict=False)
    tied = isinstance(model, GPT2LMHeadModel) and model.lm_head.weight is model.transformer.wte.weight
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]  # saved once, as wte
    if missing or result.unexpected_keys:
        raise ValueError(f"path: weights do not match the patched model: missing {missing[:6]}, unexpected {result.unexpected_keys[:6]}")
    return model.eval()


def from_hf(model, recipe: str | None = None, **overrides) -> StableGPT:
    """A StableGPT holding an HF GPT-2's weights (a GPT2LMHeadModel or GPT2Model, e.g. loaded with
    from_pretrained(local_dir)). A patched model keeps its StableConfig; a plain one takes `recipe`
    (default "gpt2": the same logits) with what it adds at identity."""
    body = _body(model)
    state = model.state_dict()
    if body is model:  # a bare GPT2Model: its keys lack GPT2LMHeadModel's "transformer." prefix
        state = {f"transformer.{k}": v for k, v in state.items()}
    if is_patched(model):
        if recipe is not None or overrides:
            raise ValueError("recipe, overrides: a patched model converts with its own StableConfig")
        return load_gpt2_state_dict(state, body.stable_config)
    for key in [k for k in state if k.endswith(_CONV1D)]:
        state[key] = state[key].t()
    return load_gpt2_state_dict(state, stable_config(model.config, recipe or "gpt2", **overrides))


def to_hf(model: StableGPT):
    """A patched GPT2LMHeadModel computing what the StableGPT does (unpatch_gpt2 it for plain GPT-2)."""
    cfg = model.config
    if not cfg.bias:
        raise ValueError("model: bias=False has no HF GPT-2 equivalent (its Conv1D and LayerNorm have biases)")
    special = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, when the vocabulary has it
    hf_config = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_inner=cfg.n_inner, n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function="gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, layer_norm_epsilon=cfg.eps,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=special, eos_token_id=special,
    )
    hf = patch_gpt2(GPT2LMHeadModel(hf_config), cfg)
    hf.load_state_dict(gpt2_state_dict(model))
    ref = model.embed.wte.weight
    return hf.to(ref.device, ref.dtype).train(model.training)
