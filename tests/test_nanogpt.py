"""nanoGPT checkpoints -> StableGPT -> nanoGPT: keys, layouts, logits."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import stableblocks as sb
from stableblocks.integrations.nanogpt import from_nanogpt, to_nanogpt

V, P, N, H, D = 64, 32, 2, 4, 32


class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm: the bias is optional."""

    def __init__(self, d, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class Block(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.ln_1, self.ln_2 = LayerNorm(D, bias), LayerNorm(D, bias)
        self.attn = nn.Module()
        self.attn.c_attn, self.attn.c_proj = nn.Linear(D, 3 * D, bias=bias), nn.Linear(D, D, bias=bias)
        # nanoGPT without flash attention keeps its causal mask as a buffer: it lands in the state dict.
        self.attn.register_buffer("bias", torch.tril(torch.ones(P, P)).view(1, 1, P, P))
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(D, 4 * D, bias=bias), nn.Linear(4 * D, D, bias=bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
        att = att.masked_fill(self.attn.bias[:, :, :T, :T] == 0, float("-inf")).softmax(-1)
        x = x + self.attn.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT's GPT module tree (same names, nn.Linear layout, tied head), written out plainly."""

    def __init__(self, bias=True):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, D), wpe=nn.Embedding(P, D), h=nn.ModuleList(Block(bias) for _ in range(N)),
            ln_f=LayerNorm(D, bias)))
        self.lm_head = nn.Linear(D, V, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        with torch.no_grad():  # non-trivial norms, so a swapped weight/bias would show
            for p in self.parameters():
                p.normal_(0, 0.2) if p.dim() >= 2 else p.uniform_(0.5, 1.5)

    def forward(self, idx):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1]))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


@pytest.mark.parametrize("bias", [True, False])
def test_round_trip_keeps_logits_and_weights(bias):
    nano = NanoGPT(bias).eval()
    idx = torch.randint(0, V, (2, 16))
    model = from_nanogpt(nano.state_dict(), n_head=H).eval()
    assert model.config.bias == bias and model.config.n_layer == N and model.config.tie_embeddings
    torch.testing.assert_close(model(idx)[0], nano(idx), atol=1e-5, rtol=1e-5)
    back = NanoGPT(bias)
    back.load_state_dict({**back.state_dict(), **to_nanogpt(model)}, strict=True)  # the mask buffers are nanoGPT's own
    for (name, p), (_, q) in zip(nano.named_parameters(), back.named_parameters()):
        assert torch.equal(p, q), name


def test_checkpoint_file(tmp_path):
    """ckpt.pt as nanoGPT's train.py writes it, from a torch.compile'd model (keys prefixed _orig_mod.)."""
    nano = NanoGPT().eval()
    args = dict(n_layer=N, n_head=H, n_embd=D, block_size=P, bias=True, vocab_size=V, dropout=0.1)
    ckpt = {"model": {f"_orig_mod.{k}": v for k, v in nano.state_dict().items()}, "model_args": args,
            "optimizer": {}, "iter_num": 5, "best_val_loss": 3.0, "config": {"dataset": "shakespeare_char"}}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    model = from_nanogpt(tmp_path / "ckpt.pt").eval()
    assert (model.config.n_head, model.config.dropout) == (H, 0.1)
    idx = torch.randint(0, V, (2, 16))
    torch.testing.assert_close(model(idx)[0], nano(idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["wesar", "qk-fc-norm", "qkv-norm"])
def test_recipes_add_their_parameters_at_identity(name):
    nano = NanoGPT().eval()
    model = from_nanogpt(nano.state_dict(), recipe=name, n_head=H).eval()
    blk, src = model.blocks[0], nano.transformer.h[0]
    assert torch.equal(blk.attn.c_attn.weight, src.attn.c_attn.weight)
    for norm in (blk.attn.q_norm, blk.attn.k_norm, blk.attn.v_norm, blk.post_norm_attn, blk.post_norm_mlp):
        if norm is not None:
            assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    if name == "wesar":  # gates at 1 and an untied copy of the head: the same function
        gates = [m.gate for m in model.modules() if getattr(m, "gate", None) is not None]
        assert len(gates) == 4 * N + 1 and all(torch.all(g == 1) for g in gates)
        assert model.lm_head.weight is not model.embed.wte.weight
        idx = torch.randint(0, V, (2, 16))
        torch.testing.assert_close(model(idx)[0], nano(idx), atol=1e-5, rtol=1e-5)
    if name == "qkv-norm":  # QKV-norm has no attention pre-norm: nanoGPT's ln_1 is dropped
        assert blk.ln_1 is None


def test_bad_checkpoints():
    nano = NanoGPT()
    state = nano.state_dict()
    with pytest.raises(ValueError, match="n_head: a bare state dict"):
        from_nanogpt(state)
    with pytest.raises(ValueError, match="n_layer: model_args say 3, the weights have 2"):
        from_nanogpt({"model": state, "model_args": dict(n_layer=3, n_head=H)})
    with pytest.raises(ValueError, match="missing weights.*ln_2"):
        from_nanogpt({k: v for k, v in state.items() if "h.1.ln_2" not in k}, n_head=H)
    with pytest.raises(ValueError, match="no place for.*extra"):
        from_nanogpt({**state, "transformer.extra.weight": torch.zeros(1)}, n_head=H)
    with pytest.raises(ValueError, match="low_rank: MLRA factors"):
        from_nanogpt(state, n_head=H, low_rank=4)
    with pytest.raises(ValueError, match="checkpoint: expected a path"):
        from_nanogpt([state])
    with pytest.raises(ValueError, match="nanoGPT's GPT has no qk_norm"):
        to_nanogpt(sb.StableGPT(sb.recipe("qk-norm", vocab_size=V, block_size=P, n_layer=N, n_head=H, n_embd=D)))


def test_the_model_never_imports_its_adapters():
    import ast
    import inspect

    import stableblocks.model

    tree = ast.parse(inspect.getsource(stableblocks.model))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if "integrations" in m], imported
    # The adapters share one public naming module rather than each other's private helpers.
    from stableblocks.integrations import gpt2_state

    assert gpt2_state.gpt2_name("blocks.0.attn.c_attn.weight") == "transformer.h.0.attn.c_attn.weight"
    assert gpt2_state.stable_name(gpt2_state.gpt2_name("embed.ln.bias")) == "embed.ln.bias"
