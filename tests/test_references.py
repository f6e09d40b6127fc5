"""Each reference op against an independent formulation written here (outputs and gradients)."""

import math

import pytest
import torch

from stableblocks.kernels.fused_add_norm import reference as add_norm_ref
from stableblocks.kernels.fused_attention import raw_logits
from stableblocks.kernels.fused_attention import reference as attention_ref
from stableblocks.kernels.fused_embedding import reference as embedding_ref
from stableblocks.kernels.layer_norm import reference as layer_norm_ref

# fp32 checks the math; bf16 (8 mantissa bits, sums of many terms in the weight gradients)
# checks that the low-precision path is the same math, judged against the size of the tensor.
TOL = {torch.float32: 1e-5, torch.bfloat16: 6e-2}


def ln_by_hand(x, w, b, eps=1e-5):
    x64 = x.double()
    mean = x64.mean(-1, keepdim=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdim=True)  # biased, as SPEC.md says
    y = (x64 - mean) / torch.sqrt(var + eps) * w.double()
    return (y if b is None else y + b.double()).to(x.dtype)


def attention_by_hand(q, k, v, causal=True, cap=None, scale=None):
    """Explicit softmax over a materialised T x T mask, head by head, in float64."""
    B, T, H, D = q.shape
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.empty(B, T, H, D, dtype=torch.float64)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool)) if causal else torch.ones(T, T, dtype=torch.bool)
    for h in range(H):
        s = torch.einsum("bid,bjd->bij", q[:, :, h].double(), k[:, :, h].double()) * scale
        if cap is not None:
            s = cap * torch.tanh(s / cap)
        s = torch.where(mask, s, torch.tensor(-torch.inf, dtype=torch.float64))
        p = torch.exp(s - s.amax(-1, keepdim=True))
        p = p / p.sum(-1, keepdim=True)
        out[:, :, h] = torch.einsum("bij,bjd->bid", p, v[:, :, h].double())
    return out.to(q.dtype)


def leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, [t for t in inputs if t is not None], g)


def close(a, b, dtype, size=None):
    """Max error within TOL of the tensor's size (or of `size`: the largest gradient of the
    op, for gradients whose true value is ~0, like the k-norm bias's under softmax)."""
    a, b = a.double(), b.double()
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    size = b.abs().max().item() if size is None else size
    assert err <= TOL[dtype] * max(1.0, size), f"max error {err:.3g} for values up to {size:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [768, 100])
def test_layer_norm_reference(dtype, width):
    x, w, b = leaves(torch.randn(3, 5, width).to(dtype) * 3 + 1, torch.randn(width).to(dtype), torch.randn(width).to(dtype))
    x2, w2, b2 = leaves(x, w, b)
    y, y2 = layer_norm_ref(x, w, b), ln_by_hand(x2, w2, b2)
    close(y, y2, dtype)
    for g, g2 in zip(grads(y, [x, w, b]), grads(y2, [x2, w2, b2])):
        close(g, g2, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("embed_ln", [False, True])
def test_embedding_reference(dtype, embed_ln):
    V, P, d, B, T = 7, 16, 48, 3, 11  # a tiny vocabulary: rows repeat
    idx = torch.randint(0, V, (B, T))
    wte, wpe, lw, lb = leaves(*(torch.randn(s).to(dtype) for s in ((V, d), (P, d), (d,), (d,))))
    wte2, wpe2, lw2, lb2 = leaves(wte, wpe, lw, lb)
    scale = math.sqrt(d)
    kw = dict(ln_weight=lw, ln_bias=lb) if embed_ln else {}
    e = embedding_ref(idx, wte, wpe, scale=scale, **kw)
    e2 = torch.stack([torch.stack([(wte2[idx[b, t]] + wpe2[t]) * scale for t in range(T)]) for b in range(B)])
    if embed_ln:
        e2 = ln_by_hand(e2, lw2, lb2)
    close(e, e2, dtype)
    inputs, inputs2 = [wte, wpe] + ([lw, lb] if embed_ln else []), [wte2, wpe2] + ([lw2, lb2] if embed_ln else [])
    for g, g2 in zip(grads(e, inputs), grads(e2, inputs2)):
        close(g, g2, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("post_norm", [False, True])
@pytest.mark.parametrize("next_norm", [False, True])
def test_add_norm_reference(dtype, post_norm, next_norm):
    d = 96
    x, z, w, b, nw, nb = leaves(torch.randn(2, 5, d).to(dtype), torch.randn(2, 5, d).to(dtype) * 4, *(torch.randn(d).to(dtype) for _ in range(4)))
    x2, z2, w2, b2, nw2, nb2 = leaves(x, z, w, b, nw, nb)
    out = add_norm_ref(x, z, w if post_norm else None, b if post_norm else None,
                       next_weight=nw if next_norm else None, next_bias=nb if next_norm else None)
    y2 = x2 + (ln_by_hand(z2, w2, b2) if post_norm else z2)
    outs2 = (y2, ln_by_hand(y2, nw2, nb2)) if next_norm else (y2,)
    outs = out if next_norm else (out,)
    for o, o2 in zip(outs, outs2):
        close(o, o2, dtype)
    total, total2 = sum(o.float().sum() * (i + 1) for i, o in enumerate(outs)), sum(o.float().sum() * (i + 1) for i, o in enumerate(outs2))
    used = [x, z] + ([w, b] if post_norm else []) + ([nw, nb] if next_norm else [])
    used2 = [x2, z2] + ([w2, b2] if post_norm else []) + ([nw2, nb2] if next_norm else [])
    for g, g2 in zip(torch.autograd.grad(total, used), torch.autograd.grad(total2, used2)):
        close(g, g2, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("cap", [None, 2.0])
@pytest.mark.parametrize("norms", ["none", "qk", "qkv"])
def test_attention_reference(dtype, causal, cap, norms):
    B, T, H, D = 2, 13, 3, 16
    q, k, v = leaves(*(torch.randn(B, T, H, D).to(dtype) * 2 for _ in range(3)))
    nw = {n: leaves(torch.randn(D).to(dtype), torch.randn(D).to(dtype)) for n in "qkv"}
    q2, k2, v2 = leaves(q, k, v)
    nw2 = {n: leaves(*nw[n]) for n in "qkv"}
    used = {"none": "", "qk": "qk", "qkv": "qkv"}[norms]
    kw = {f"{n}_norm": tuple(nw[n]) for n in used}
    o = attention_ref(q, k, v, causal=causal, softcap=cap, **kw)
    ins2 = {"q": q2, "k": k2, "v": v2}
    for n in used:
        ins2[n] = ln_by_hand(ins2[n], *nw2[n])
    o2 = attention_by_hand(ins2["q"], ins2["k"], ins2["v"], causal=causal, cap=cap)
    close(o, o2, dtype)
    params = [q, k, v] + [p for n in used for p in nw[n]]
    params2 = [q2, k2, v2] + [p for n in used for p in nw2[n]]
    gs, gs2 = grads(o, params), grads(o2, params2)
    size = max(g.abs().max().item() for g in gs2)
    for g, g2 in zip(gs, gs2):
        close(g, g2, dtype, size if dtype != torch.float32 else None)


def test_raw_logits_are_uncapped_scaled_scores():
    q, k = torch.randn(1, 5, 2, 8) * 30, torch.randn(1, 5, 2, 8) * 30
    s = raw_logits(q, k)
    expected = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(8)
    torch.testing.assert_close(s, expected)
    assert s.abs().max() > 50  # beyond any cap: nothing bounded it
