"""StableGPT: recipes, initialisation, equivalence with a plain GPT-2, bad input."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import stableblocks as sb

TINY = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)

# SPEC.md section 5, transcribed: (embedding, init, attention, post_norm, attention pre-norm, embedding decay)
SPEC_TABLE = {
    "gpt2": ("plain", "gpt2", "plain", False, True, True),
    "vanilla": ("plain", "scaled", "plain", False, True, False),
    "scaled-embed": ("scale", "scaled", "plain", False, True, False),
    "embed-ln": ("ln", "scaled", "plain", False, True, False),
    "qk-norm": ("plain", "scaled", "qk", False, True, False),
    "qk-norm-cap": ("plain", "scaled", "qk+cap50", False, True, False),
    "qkv-norm": ("plain", "scaled", "qkv", False, False, False),
    "qk-fc-norm": ("plain", "scaled", "qk", True, True, False),
    "wesar": ("plain", "wesar", "plain", False, True, False),
    "qk-clip": ("plain", "scaled", "plain", False, True, False),  # + qk_clip = 100
}


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_recipe_matches_spec_row(name):
    embedding, init, attention, post_norm, pre_norm, embed_decay = SPEC_TABLE[name]
    cfg = sb.recipe(name, **TINY)
    assert (cfg.embed_scale, cfg.embed_ln) == (embedding == "scale", embedding == "ln")
    assert cfg.init == init
    assert cfg.qk_norm == (attention in ("qk", "qk+cap50"))
    assert cfg.qkv_norm == (attention == "qkv")
    assert cfg.softcap == (50.0 if attention == "qk+cap50" else None)
    assert cfg.qk_clip == (100.0 if name == "qk-clip" else None)
    assert cfg.post_norm == post_norm
    assert cfg.embed_weight_decay == embed_decay
    assert cfg.tie_embeddings == (init != "wesar")
    assert (cfg.dropout, cfg.activation, cfg.logit_softcap, cfg.z_loss) == (0.0, "gelu", None, 0.0)
    block = sb.StableGPT(cfg).blocks[0]
    assert (block.ln_1 is not None) == pre_norm
    assert (block.post_norm_attn is not None, block.post_norm_mlp is not None) == (post_norm, post_norm)


def test_recipe_names_and_errors():
    assert set(SPEC_TABLE) | {"stable"} == set(sb.recipes())
    with pytest.raises(ValueError, match="recipe: unknown name 'nope'.*embed-ln"):
        sb.recipe("nope")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['n_layers'\].*n_layer"):
        sb.recipe("gpt2", n_layers=3)


@pytest.mark.parametrize("name", sorted(SPEC_TABLE) + ["stable"])
def test_recipe_trains_on_a_fixed_batch(name):
    torch.manual_seed(0)
    model = sb.StableGPT(sb.recipe(name, **TINY))
    # WeSaR's weights have std 0.0063: Adam's step is relative to that, so it takes a smaller lr.
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=2e-3 if name == "wesar" else 1e-2)
    x = torch.randint(0, 64, (4, 32))
    y = torch.roll(x, -1, 1)
    losses = []
    for _ in range(20):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses


def _std(t):
    return t.detach().float().std().item()


@pytest.mark.parametrize("init", ["gpt2", "scaled"])
def test_init_std(init):
    d, N = 512, 8
    model = sb.StableGPT(sb.StableConfig(vocab_size=4096, block_size=512, n_layer=N, n_head=8, n_embd=d, init=init))
    sigma = 0.02 if init == "gpt2" else math.sqrt(2 / (5 * d))
    if init == "scaled":
        assert sigma == pytest.approx(0.02795, abs=1e-5)
    for blk in model.blocks:
        for w, want in ((blk.attn.c_attn.weight, sigma), (blk.mlp.c_fc.weight, sigma),
                        (blk.attn.c_proj.weight, sigma / math.sqrt(2 * N)), (blk.mlp.c_proj.weight, sigma / math.sqrt(2 * N))):
            assert _std(w) == pytest.approx(want, rel=0.02)
        assert torch.all(blk.attn.c_attn.bias == 0) and torch.all(blk.ln_2.weight == 1)
    assert _std(model.embed.wte.weight) == pytest.approx(sigma, rel=0.02)
    assert _std(model.embed.wpe.weight) == pytest.approx(sigma, rel=0.02)


def test_wesar_init():
    d, N = 512, 8
    model = sb.StableGPT(sb.recipe("wesar", vocab_size=4096, block_size=512, n_layer=N, n_head=8, n_embd=d))
    sigma = math.sqrt(4e-5)
    need = {"qkv": math.sqrt(1 / d), "o": math.sqrt(1 / (2 * N * d)), "fc1": math.sqrt(1 / d),
            "fc2": math.sqrt(2 / (8 * N * d)), "head": math.sqrt(1 / d)}
    layers = [(blk.attn.c_attn, "qkv") for blk in model.blocks] + [(blk.attn.c_proj, "o") for blk in model.blocks]
    layers += [(blk.mlp.c_fc, "fc1") for blk in model.blocks] + [(blk.mlp.c_proj, "fc2") for blk in model.blocks]
    layers += [(model.lm_head, "head")]
    for lin, role in layers:
        assert _std(lin.weight) == pytest.approx(sigma, rel=0.02)
        assert lin.gate is not None and lin.gate.requires_grad
        assert _std(lin.effective_weight()) == pytest.approx(need[role], rel=0.02)
    assert model.blocks[0].attn.c_attn.gate.numel() == 3
    assert model.lm_head.weight is not model.embed.wte.weight
    assert _std(model.embed.wte.weight) == pytest.approx(sigma, rel=0.02)
    # Gates, norms, biases and embeddings are not decayed.
    decay, no_decay, gate_group = model.param_groups(0.1, gate_weight_decay=0.01)
    assert gate_group["name"] == "wesar_gates" and gate_group["weight_decay"] == 0.01
    assert {id(m.gate) for m, _ in layers} == {id(p) for p in gate_group["params"]}
    assert id(model.embed.wte.weight) in {id(p) for p in no_decay["params"]}
    assert id(model.lm_head.weight) in {id(p) for p in decay["params"]}


def _gated_grads(lin, x, dy, materialise: bool):
    """Output and gradients (x, W, gate, bias) of a gated StableLinear, or of F.linear over the
    materialised gate * W (the plain formula autograd differentiates)."""
    params = [x, lin.weight, lin.gate, lin.bias]
    if materialise:
        rows = lin.gate.repeat_interleave(lin.out_features // lin.gate.numel()).unsqueeze(1)
        y = F.linear(x, lin.weight * rows, lin.bias)
    else:
        y = lin(x)
    return (y, *torch.autograd.grad(y, params, dy))


@pytest.mark.parametrize("gates", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, "autocast-bf16"])
def test_gated_linear_matches_the_materialised_formula(gates, dtype):
    lin = sb.modules.StableLinear(24, 3 * 8, gates=gates)
    with torch.no_grad():
        lin.gate.copy_(torch.tensor([0.5, 3.0, -2.0][:gates]))
    autocast = dtype == "autocast-bf16"
    if not autocast:
        lin = lin.to(dtype)
    x = torch.randn(2, 5, 24, dtype=lin.weight.dtype).transpose(0, 1).requires_grad_()  # non-contiguous
    dy = torch.randn(5, 2, 24, dtype=torch.bfloat16 if autocast else lin.weight.dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = _gated_grads(lin, x, dy, materialise=False)
        want = _gated_grads(lin, x, dy, materialise=True)
    for name, g, w in zip(("y", "dx", "dW", "dgate", "dbias"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        # The gate's gradient sums its slice in another order: float rounding only.
        torch.testing.assert_close(g, w, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-12 if dtype == torch.float64 else 1e-5, msg=name)


def test_gated_linear_saves_no_gated_weight():
    lin = sb.modules.StableLinear(64, 3 * 64, gates=3)
    x = torch.randn(4, 64, requires_grad=True)
    params = {p.untyped_storage()._cdata for p in lin.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage()._cdata not in params:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lin(x).sum().backward()
    assert sum(saved.values()) == x.numel() * x.element_size()  # the input only
    assert lin.gate.grad is not None and lin.weight.grad is not None


def test_fold_wesar_gates_keeps_the_function():
    model = sb.StableGPT(sb.recipe("wesar", **TINY)).eval()
    idx = torch.randint(0, 64, (2, 16))
    before, _ = model(idx)
    sb.fold_wesar_gates(model)
    after, _ = model(idx)
    assert all(getattr(m, "gate", None) is None for m in model.modules())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_embedding_decay_groups():
    for name, decayed in (("gpt2", True), ("vanilla", False)):
        model = sb.StableGPT(sb.recipe(name, **TINY))
        decay, no_decay = model.param_groups(0.1)
        ids = {id(p) for p in decay["params"]}
        assert (id(model.embed.wte.weight) in ids) == decayed
        assert all(p.dim() >= 2 for p in decay["params"])
        n_all = len({id(p) for p in model.parameters()})
        assert len(decay["params"]) + len(no_decay["params"]) == n_all


class NanoGPT(nn.Module):
    """A plain GPT-2 as nanoGPT writes it, with exact GELU and an explicit softmax."""

    def __init__(self, V, P, N, H, d):
        super().__init__()
        self.H = H
        self.wte, self.wpe = nn.Embedding(V, d), nn.Embedding(P, d)
        self.h = nn.ModuleList(nn.ModuleDict(dict(
            ln_1=nn.LayerNorm(d), c_attn=nn.Linear(d, 3 * d), c_proj=nn.Linear(d, d),
            ln_2=nn.LayerNorm(d), c_fc=nn.Linear(d, 4 * d), mlp_proj=nn.Linear(4 * d, d))) for _ in range(N))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for b in self.h:
            q, k, v = b.c_attn(b.ln_1(x)).split(x.shape[-1], dim=2)
            q, k, v = (t.view(B, T, self.H, -1).transpose(1, 2) for t in (q, k, v))
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
            att = att.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf")).softmax(-1)
            x = x + b.c_proj((att @ v).transpose(1, 2).reshape(B, T, -1))
            x = x + b.mlp_proj(F.gelu(b.c_fc(b.ln_2(x))))
        return self.ln_f(x) @ self.wte.weight.T


def test_gpt2_recipe_equals_plain_gpt2():
    cfg = sb.recipe("gpt2", vocab_size=50, block_size=16, n_layer=3, n_head=4, n_embd=32)
    model = sb.StableGPT(cfg).eval()
    ref = NanoGPT(50, 16, 3, 4, 32).eval()
    with torch.no_grad():
        ref.wte.weight.copy_(model.embed.wte.weight)
        ref.wpe.weight.copy_(model.embed.wpe.weight)
        ref.ln_f.load_state_dict(model.ln_f.state_dict())
        for b, s in zip(ref.h, model.blocks):
            for mine, theirs in ((b.ln_1, s.ln_1), (b.c_attn, s.attn.c_attn), (b.c_proj, s.attn.c_proj),
                                 (b.ln_2, s.ln_2), (b.c_fc, s.mlp.c_fc), (b.mlp_proj, s.mlp.c_proj)):
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)
    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(model(idx)[0], ref(idx), atol=1e-5, rtol=1e-5)


def test_logit_softcap_and_z_loss():
    idx = torch.randint(0, 64, (2, 16))
    plain = sb.StableGPT(sb.recipe("gpt2", **TINY))
    capped = sb.StableGPT(sb.recipe("gpt2", logit_softcap=0.5, z_loss=1e-2, **TINY))
    capped.load_state_dict(plain.state_dict())
    logits, c_logits = plain(idx)[0], capped(idx)[0]
    torch.testing.assert_close(c_logits, 0.5 * torch.tanh(logits / 0.5))
    # With targets the model returns no logits; its fused loss equals the eager formula on them.
    targets = idx.clone()
    targets[0, :5] = -1
    none, c_loss = capped(idx, targets)
    assert none is None
    flat, kept = c_logits.reshape(-1, 64), targets.reshape(-1) != -1
    want = (F.cross_entropy(flat, targets.reshape(-1), ignore_index=-1)
            + 1e-2 * torch.logsumexp(flat[kept], -1).pow(2).mean())
    torch.testing.assert_close(c_loss, want)
    # Every target ignored: 0 with zero gradients (the eager formula's mean over nothing is NaN).
    loss = capped(idx, torch.full_like(idx, -1))[1]
    loss.backward()
    assert loss.item() == 0.0 and all(not p.grad.any() for p in capped.parameters())


def test_low_rank_attention_trains_and_has_rank_r():
    cfg = sb.recipe("vanilla", low_rank=4, **TINY)
    model = sb.StableGPT(cfg)
    attn = model.blocks[0].attn
    assert attn.c_attn.weight.shape == (3 * 2 * 4, 32)
    # Each head's query map d -> D is the product of d -> r and r -> D: rank <= r.
    w_down = attn.c_attn.weight.view(3, 2, 4, 32)[0, 0]  # (r, d) for the first head's q
    w_q = attn.c_attn_up[0, 0].T @ w_down  # (D, d)
    assert torch.linalg.matrix_rank(w_q.detach()) == 4
    _, loss = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    loss.backward()
    assert attn.c_attn_up.grad is not None


def test_generate():
    model = sb.StableGPT(sb.recipe("stable", **TINY))
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=40, top_k=5)
    assert out.shape == (1, 43) and out.max() < 64


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda m: m(torch.rand(2, 8)), "idx: expected an int64 or int32 tensor"),
        (lambda m: m(torch.zeros(2, 33, dtype=torch.long)), "idx: sequence length 33 exceeds block_size 32"),
        (lambda m: m(torch.zeros(8, dtype=torch.long)), r"idx: expected shape \(B, T\)"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make(sb.StableGPT(sb.recipe("gpt2", **TINY)))


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(n_head=3), "n_head: 3 does not divide n_embd = 32"),
        (dict(qk_norm=True, qkv_norm=True), "qk_norm and qkv_norm"),
        (dict(low_rank=17), "low_rank"),
        (dict(softcap=0.0), "softcap"),
        (dict(logit_softcap=-1.0), "logit_softcap"),
        (dict(init="xavier"), "init"),
        (dict(activation="relu"), "activation"),
        (dict(init="wesar"), "tie_embeddings"),
    ],
)
def test_bad_config(fields, match):
    with pytest.raises(ValueError, match=match):
        sb.StableConfig(**{**TINY, **fields})


def test_backend_switch(monkeypatch):
    from stableblocks.kernels import backend

    with pytest.raises(ValueError, match="backend 'cuda'"):
        sb.set_backend("cuda")
    monkeypatch.setattr(backend, "KERNELS", set())
    sb.set_backend("triton")
    with pytest.raises(NotImplementedError, match="layer_norm: no Triton kernel"):
        sb.kernels.layer_norm(torch.randn(2, 4), torch.ones(4))
    sb.set_backend("auto")
    assert not backend.use_triton("layer_norm", torch.randn(2))  # no kernel: the reference


def test_backend_using_restores_the_previous_backend():
    from stableblocks.kernels import backend

    sb.set_backend("auto")
    with pytest.raises(RuntimeError, match="inside"):
        with backend.using("reference"):
            assert sb.get_backend() == "reference"
            raise RuntimeError("inside")
    assert sb.get_backend() == "auto"


@pytest.mark.parametrize("name", ["qk-norm", "qkv-norm", "qk-norm-cap"])
def test_attention_reference_path_matches_the_op_on_the_projection_views(name):
    """The reference normalises contiguous copies of the strided q, k (v) views: the same values,
    so StableAttention gives the op's outputs and gradients on the projection's views, bit for bit."""
    attn = sb.modules.StableAttention(sb.recipe(name, **TINY))
    x = torch.randn(2, 9, TINY["n_embd"], requires_grad=True)
    dy = torch.randn(2, 9, TINY["n_embd"])
    params = [x, *attn.parameters()]
    got = torch.autograd.grad(attn(x), params, dy)
    q, k, v = attn.qkv(x)
    y = sb.kernels.fused_attention(q, k, v, softcap=attn.softcap, eps=attn.eps, **attn.norms())
    want = torch.autograd.grad(attn.c_proj(y.flatten(2)), params, dy)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
