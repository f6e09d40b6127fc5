"""The Hugging Face GPT-2 patch: same logits under recipe gpt2, masks, training, save/reload, export.

Runs against the installed transformers (5.x) and, in CI, against 4.57 as well (.ci/run).
"""

import copy
import math

import pytest
import torch

import stableblocks as sb

transformers = pytest.importorskip("transformers", reason="the HF integration needs the 'hf' extra: pip install 'stableblocks[hf]'")
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from stableblocks.integrations.hf import from_hf, load_patched, param_groups, patch_gpt2, to_hf, unpatch_gpt2  # noqa: E402
from stableblocks.modules import StableBlock  # noqa: E402

transformers.logging.set_verbosity_error()
V, P = 64, 32


def hf_config(**overrides):
    fields = dict(vocab_size=V, n_positions=P, n_layer=2, n_head=2, n_embd=32, bos_token_id=None, eos_token_id=None,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2Config(**{**fields, **overrides})


def gpt2(**overrides):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_config(**overrides))
    with torch.no_grad():  # non-trivial norms and biases, so a swapped or dropped weight shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.1)
    return model


def idx(b=2, t=16):
    return torch.randint(0, V, (b, t))


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_gpt2_recipe_keeps_logits_and_gradients(activation):
    original = gpt2(activation_function=activation)
    model = patch_gpt2(copy.deepcopy(original), "gpt2")
    x = idx()
    ref, out = original(x, labels=x), model(x, labels=x)
    assert out.logits is None  # training with labels: the fused loss never forms them
    torch.testing.assert_close(model(x).logits, original(x).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    ref.loss.backward()
    out.loss.backward()
    for name, p in original.named_parameters():
        mine = model.get_parameter(name)
        grad = p.grad.t() if isinstance(original.get_submodule(name.rsplit(".", 1)[0]), Conv1D) and p.dim() == 2 else p.grad
        torch.testing.assert_close(mine.grad, grad, atol=1e-5, rtol=1e-4, msg=name)
    # Stableblocks modules under HF's names, the config kept consistent and recording the recipe.
    assert all(isinstance(b, StableBlock) for b in model.transformer.h)
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in original.named_parameters()}
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.config.stableblocks["activation"] == ("gelu_tanh" if activation == "gelu_new" else "gelu")
    assert model.config.use_cache is False


def test_bare_gpt2model_and_bf16():
    torch.manual_seed(0)
    original = GPT2Model(hf_config())
    model = patch_gpt2(copy.deepcopy(original), "gpt2")
    x = idx()
    torch.testing.assert_close(model(x).last_hidden_state, original(x).last_hidden_state, atol=1e-5, rtol=1e-5)
    hidden = model(x, output_hidden_states=True).hidden_states
    assert len(hidden) == 3 and torch.equal(hidden[-1], model(x).last_hidden_state)
    half = patch_gpt2(GPT2LMHeadModel(hf_config()).to(torch.bfloat16), "qk-norm-cap")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half(x).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["wesar", "qk-fc-norm", "qkv-norm", "embed-ln"])
def test_added_parameters_start_at_identity(name):
    original = gpt2()
    model = patch_gpt2(copy.deepcopy(original), name)
    blk, src = model.transformer.h[0], original.transformer.h[0]
    assert torch.equal(blk.attn.c_attn.weight, src.attn.c_attn.weight.t())
    assert torch.equal(blk.mlp.c_proj.bias, src.mlp.c_proj.bias)
    added = [m for m in (blk.attn.q_norm, blk.attn.k_norm, blk.attn.v_norm, blk.post_norm_attn, blk.post_norm_mlp,
                         model.transformer.ln_embed) if m is not None]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in added)
    assert len(added) == {"wesar": 0, "qk-fc-norm": 4, "qkv-norm": 3, "embed-ln": 1}[name]
    if name == "qkv-norm":  # no attention pre-norm
        assert blk.ln_1 is None and model.config.stableblocks["qkv_norm"]
    if name == "wesar":  # gates at 1 and an untied copy of the head: the same logits
        gates = [m.gate for m in model.modules() if getattr(m, "gate", None) is not None]
        assert len(gates) == 4 * 2 + 1 and all(torch.all(g == 1) for g in gates)
        assert model.lm_head.weight is not model.transformer.wte.weight and not model.config.tie_word_embeddings
        x = idx()
        torch.testing.assert_close(model(x).logits, original(x).logits, atol=1e-5, rtol=1e-5)


def test_reinit_applies_the_recipe_init():
    d, n = 64, 2
    model = patch_gpt2(GPT2LMHeadModel(hf_config(n_embd=d, n_head=4)), "wesar", reinit=True)
    sigma = math.sqrt(4e-5)
    blk = model.transformer.h[0]
    assert blk.attn.c_attn.weight.std().item() == pytest.approx(sigma, rel=0.05)
    assert blk.mlp.c_proj.gate.item() == pytest.approx(math.sqrt(2 / (8 * n * d)) / sigma)
    assert model.transformer.wte.weight.std().item() == pytest.approx(sigma, rel=0.05)
    scaled = patch_gpt2(GPT2LMHeadModel(hf_config(n_embd=d, n_head=4)), "vanilla", reinit=True)
    std = math.sqrt(2 / (5 * d))
    assert scaled.transformer.h[1].attn.c_proj.weight.std().item() == pytest.approx(std / math.sqrt(2 * n), rel=0.05)


def test_padding_mask():
    model = patch_gpt2(gpt2(), "qk-norm").eval()
    x = idx()
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, 12:] = 0  # right padding: the real tokens' logits are exact
    padded = model(x, attention_mask=mask).logits
    torch.testing.assert_close(padded[0, :12], model(x[:1, :12]).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1], model(x[1:]).logits[0])
    left = torch.ones(2, 16, dtype=torch.long)
    left[0, :3] = 0
    with pytest.raises(ValueError, match="attention_mask: .* right padding only"):
        model(x, attention_mask=left)
    with pytest.raises(ValueError, match=r"attention_mask: expected a \(batch, seq\) padding mask"):
        model(x, attention_mask=torch.ones(2, 1, 16, 16))


def test_generate_recomputes_without_cache():
    model = patch_gpt2(gpt2(), "qk-norm-cap").eval()
    prompt = idx(1, 4)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    want = prompt
    for _ in range(6):
        want = torch.cat([want, model(want).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, want)


def _a_kv_cache(x):
    """A real KV cache of a plain GPT-2 for the prefix x (the type either transformers version uses)."""
    out = gpt2()(x, use_cache=True)
    return out.past_key_values


@pytest.mark.parametrize("name", ["past_key_values", "cache"])
def test_every_kv_cache_name_is_refused(name):
    # A patched forward that swallowed the cache would return the logits of a forward without the
    # prefix: a silent wrong answer.
    model = patch_gpt2(gpt2(), "gpt2").eval()
    x = idx(1, 8)
    with pytest.raises(ValueError, match="no KV cache"):
        model.transformer(x[:, 6:], **{name: _a_kv_cache(x[:, :6])})
    if name == "cache" and transformers.__version__.startswith("4."):
        return  # 4.x's GPT2LMHeadModel has no `cache` argument (its own **kwargs drop it)
    with pytest.raises(ValueError, match="no KV cache"):
        model(x[:, 6:], **{name: _a_kv_cache(x[:, :6])})


def test_unknown_arguments_are_refused_by_name_and_known_ones_honoured():
    model = patch_gpt2(gpt2(), "gpt2").eval()
    x = idx(1, 8)
    with pytest.raises(ValueError, match="frobnicate .unknown argument."):
        model.transformer(x, frobnicate=True)
    # 4.57 passes the tokens' positions as cache_position: honoured like position_ids.
    pos = torch.arange(3, 11)
    torch.testing.assert_close(model.transformer(x, cache_position=pos).last_hidden_state,
                               model.transformer(x, position_ids=pos[None]).last_hidden_state)
    assert not torch.allclose(model.transformer(x, cache_position=pos).last_hidden_state, model.transformer(x).last_hidden_state)
    # HF's Trainer passes num_items_in_batch under gradient accumulation: the loss honours it.
    original = gpt2().eval()
    ref = original(x, labels=x, num_items_in_batch=3).loss
    torch.testing.assert_close(model(x, labels=x, num_items_in_batch=3).loss, ref)
    assert not torch.allclose(ref, original(x, labels=x).loss)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m(idx(), use_cache=True), "use_cache"),
        (lambda m: m(idx(), token_type_ids=idx()), "token_type_ids"),
        (lambda m: m(idx(), output_attentions=True), "output_attentions"),
        (lambda m: patch_gpt2(m, "gpt2"), "already patched"),
        (unpatch_gpt2, "plain GPT-2 has no qk_norm"),
    ],
)
def test_unsupported_calls_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(patch_gpt2(gpt2(), "qk-norm"))


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (lambda: gpt2(scale_attn_by_inverse_layer_idx=True), {}, "scale_attn_by_inverse_layer_idx"),
        (lambda: gpt2(activation_function="relu"), {}, "activation_function='relu'"),
        (lambda: gpt2(resid_pdrop=0.1), {}, "dropout: the model's resid_pdrop"),
        (gpt2, dict(n_layer=3), "n_layer: the model has 2"),
        (gpt2, dict(logit_softcap=30.0), "logit_softcap"),
        (lambda: gpt2(tie_word_embeddings=False), dict(tie_embeddings=True), "tie_embeddings: the model's LM head is not tied"),
        (gpt2, dict(low_rank=4), "low_rank: .* pass reinit=True"),
        (lambda: torch.nn.Linear(2, 2), {}, "expected a transformers GPT2LMHeadModel"),
    ],
)
def test_bad_patch_arguments(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        patch_gpt2(make(), "qk-norm", **kwargs)


def test_plain_training_loop_and_gradient_checkpointing():
    model = patch_gpt2(gpt2(), "stable", reinit=True)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model.transformer.h[0].attn.q_norm.weight) not in decayed and id(model.transformer.wte.weight) not in decayed
    assert id(model.transformer.h[0].attn.c_attn.weight) in decayed
    x = idx(4, 32)
    losses = []
    for _ in range(15):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    # Activation checkpointing: each block runs again in backward, and the gradients do not change.
    model.zero_grad()
    model(x, labels=x).loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable  # 5.x / 4.x
    enable()
    calls = []
    model.transformer.h[0].register_forward_pre_hook(lambda *_: calls.append(1))
    model.zero_grad()
    model(x, labels=x).loss.backward()
    assert len(calls) == 2
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


def test_trainer_trains_saves_and_reloads(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = patch_gpt2(GPT2LMHeadModel(hf_config()), "wesar", reinit=True)
    rows = torch.randint(0, V, (8, 32))
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=8,
                             learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-3)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.3, losses
    model.save_pretrained(tmp_path / "saved")
    reloaded = load_patched(str(tmp_path / "saved"))
    assert reloaded.config.stableblocks == model.config.stableblocks
    model.eval()
    torch.testing.assert_close(reloaded(rows).logits, model(rows).logits, atol=0, rtol=0)
    with pytest.raises(RuntimeError):  # plain GPT-2 refuses the nn.Linear layout: no silent misload
        GPT2LMHeadModel.from_pretrained(tmp_path / "saved")


def test_unpatch_gives_plain_gpt2(tmp_path):
    model = patch_gpt2(gpt2(), "wesar", embed_scale=True)
    with torch.no_grad():  # trained gates and weights, as after a run
        for p in model.parameters():
            p.mul_(1 + 0.1 * torch.randn_like(p))
    x = idx()
    before = model(x).logits
    unpatch_gpt2(model)
    assert type(model.transformer.h[0]).__name__ == "GPT2Block" and isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    assert not hasattr(model.config, "stableblocks") and model.config.use_cache
    torch.testing.assert_close(model(x).logits, before, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    plain = GPT2LMHeadModel.from_pretrained(tmp_path)
    torch.testing.assert_close(plain(x).logits, before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not a patched model"):
        load_patched(str(tmp_path))


@pytest.mark.parametrize("name", ["gpt2", "qk-fc-norm"])
def test_from_hf_and_to_hf(name):
    original = gpt2()
    x = idx()
    patched = patch_gpt2(copy.deepcopy(original), name)
    for source in (original, patched):  # plain (recipe gpt2) and patched (its own config)
        model = from_hf(source).eval()
        torch.testing.assert_close(model(x)[0], source(x).logits, atol=1e-5, rtol=1e-5)
    bare = from_hf(original.transformer)
    torch.testing.assert_close(bare(x)[0], original(x).logits, atol=1e-5, rtol=1e-5)
    stable = sb.StableGPT(sb.recipe(name, vocab_size=V, block_size=P, n_layer=2, n_head=2, n_embd=32, embed_ln=True)).eval()
    exported = to_hf(stable)
    torch.testing.assert_close(exported(x).logits, stable(x)[0], atol=1e-5, rtol=1e-5)


def _hf_test_config():
    """transformers' own GPT-2 test config (GPT2ModelTester): vocab 99, width 32, 5 layers of 4 heads, n_inner 37."""
    return hf_config(vocab_size=99, n_embd=32, n_layer=5, n_head=4, n_inner=37, n_positions=512,
                     activation_function="gelu")


def test_transformers_test_config_matches_the_unpatched_model(tmp_path):
    torch.manual_seed(0)
    original = GPT2LMHeadModel(_hf_test_config()).eval()
    model = patch_gpt2(copy.deepcopy(original), "gpt2").eval()
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (37, 32)
    x = torch.randint(0, 99, (3, 7))
    ref, out = original(x, labels=x), model(x, labels=x)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    gen = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=0)
    assert torch.equal(model.generate(x, **gen), original.generate(x, **gen, use_cache=False))
    # resize, then save and reload: the recorded config follows the vocabulary.
    original.resize_token_embeddings(109)
    model.resize_token_embeddings(109)
    assert model.config.stableblocks["vocab_size"] == 109
    with torch.no_grad():  # the new rows are sampled; give both the same
        model.transformer.wte.weight.copy_(original.transformer.wte.weight)
    y = torch.randint(0, 109, (2, 9))
    torch.testing.assert_close(model(y).logits, original(y).logits, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(load_patched(str(tmp_path))(y).logits, model(y).logits, atol=0, rtol=0)


def test_resize_keeps_an_untied_gated_head(tmp_path):
    model = patch_gpt2(gpt2(), "wesar").eval()
    with torch.no_grad():
        model.lm_head.gate.fill_(1.5)
    model.resize_token_embeddings(V + 5)
    assert model.lm_head.gate.item() == 1.5 and model.lm_head.weight.shape[0] == V + 5
    model.save_pretrained(tmp_path)
    y = torch.randint(0, V + 5, (2, 9))
    torch.testing.assert_close(load_patched(str(tmp_path))(y).logits, model(y).logits, atol=0, rtol=0)


def test_n_inner_sets_the_mlp_width_and_wesar_fc2_std():
    d, n, inner = 32, 2, 37
    model = patch_gpt2(GPT2LMHeadModel(hf_config(n_embd=d, n_inner=inner)), "wesar", reinit=True)
    assert model.transformer.h[0].mlp.c_proj.gate.item() == pytest.approx(math.sqrt(1 / (n * inner)) / math.sqrt(4e-5))
    stable = sb.StableGPT(sb.recipe("qk-norm", vocab_size=V, block_size=P, n_layer=n, n_head=2, n_embd=d, n_inner=inner))
    assert to_hf(stable).config.n_inner == inner


@pytest.mark.parametrize(
    "make, call, match",
    [
        (lambda: gpt2(scale_attn_by_inverse_layer_idx=True), None, "scale_attn_by_inverse_layer_idx"),
        (lambda: gpt2(scale_attn_weights=False), None, "scale_attn_weights=False"),
        (lambda: gpt2(add_cross_attention=True), None, "add_cross_attention"),
        (gpt2, lambda m: m(idx(), head_mask=torch.ones(2, 2)), "head_mask"),
        (gpt2, lambda m: m(idx(), encoder_hidden_states=torch.zeros(2, 3, 32)), "encoder_hidden_states"),
    ],
)
def test_refused_hf_options_name_themselves(make, call, match):
    # Each of these is listed in the README with its reason.
    with pytest.raises(ValueError, match=match):
        model = patch_gpt2(make(), "qk-norm")
        call(model)


def test_labels_loss_is_fused_and_follows_hf_rules():
    """Training with labels: HF's shift, -100 ignored, num_items_in_batch; loss and gradients as
    transformers' own, without logits. Every label ignored: 0, where HF's mean gives NaN."""
    original = gpt2()
    model = patch_gpt2(copy.deepcopy(original), "gpt2")
    x = idx()
    labels = x.masked_fill(torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.3, -100)
    for extra in ({}, {"num_items_in_batch": 11}):
        ref, out = original(x, labels=labels, **extra), model(x, labels=labels, **extra)
        assert out.logits is None
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    wte = model.transformer.wte.weight
    grad = torch.autograd.grad(model(x, labels=labels).loss, wte)[0]
    ref_grad = torch.autograd.grad(original(x, labels=labels).loss, original.transformer.wte.weight)[0]
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)
    assert model(x, labels=torch.full_like(x, -100)).loss.item() == 0.0
    assert original(x, labels=torch.full_like(x, -100)).loss.isnan()
