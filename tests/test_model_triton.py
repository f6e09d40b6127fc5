"""StableGPT on the LayerNorm-family Triton kernels (under the interpreter) trains like the reference.

Backend "auto" takes each op's kernel where one exists and the reference elsewhere;
backend.LAUNCHES shows that the embedding, add-norm and final-norm kernels really ran."""

import math
from collections import Counter

import pytest
import torch

import stableblocks as sb
from stableblocks.kernels import backend

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
OURS = ("fused_embedding_fwd", "fused_embedding_bwd", "fused_add_norm_fwd", "fused_add_norm_bwd",
        "layer_norm_fwd", "layer_norm_bwd")


def _train(name, which, steps=4, **fields):
    sb.set_backend(which)
    torch.manual_seed(0)
    model = sb.StableGPT(sb.recipe(name, **TINY, **fields))
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-2)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (3, 16), generator=gen)
    y = torch.roll(x, -1, 1)
    losses, first_grads = [], None
    for _ in range(steps):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        first_grads = first_grads or {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    return losses, first_grads


# qk-fc-norm + Embed LN exercises every option: the embedding's LN, both post-norms and the
# MLP pre-norm fused into the attention's residual add. gpt2 has a plain embedding, and its
# MLP's residual add has no norm at all: that add needs no backward kernel.
@pytest.mark.parametrize("name, fields, add_norm_bwd_per_block", [
    ("qk-fc-norm", dict(embed_ln=True, embed_scale=True), 2),
    ("gpt2", {}, 1),
], ids=["qk-fc-norm+embed-ln", "gpt2"])
def test_training_on_triton_kernels_matches_reference(name, fields, add_norm_bwd_per_block):
    reference, ref_grads = _train(name, "reference", **fields)
    before = Counter(backend.LAUNCHES)
    kernels, grads = _train(name, "auto", **fields)
    ran = {k: backend.LAUNCHES[k] - before[k] for k in OURS}
    steps, blocks = 4, TINY["n_layer"]
    assert ran == {"fused_embedding_fwd": steps, "fused_embedding_bwd": steps,
                   "fused_add_norm_fwd": 2 * blocks * steps,
                   "fused_add_norm_bwd": add_norm_bwd_per_block * blocks * steps,
                   # each block's attention pre-norm, and the final norm
                   "layer_norm_fwd": (blocks + 1) * steps, "layer_norm_bwd": (blocks + 1) * steps}
    assert all(math.isfinite(v) for v in kernels)
    assert kernels[-1] < kernels[0]
    # fp32 throughout: the two backends differ by summation order only.
    for k, r in zip(kernels, reference):
        assert k == pytest.approx(r, rel=1e-4), (kernels, reference)
    # Every parameter's first gradient. (Not the parameters after Adam: it blows the ~1e-9 noise
    # in gradients that are zero in exact arithmetic, like the k-norm bias's, up to lr-sized steps.)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-3, atol=1e-5, msg=n)


def test_bf16_autocast_on_every_kernel():
    """Autocast: bf16 projections beside the fp32 residual stream and fp32 norm weights. Every op,
    attention included, runs its kernel, and the loss and gradients follow the reference's."""
    def step(which):
        sb.set_backend(which)
        torch.manual_seed(0)
        model = sb.StableGPT(sb.recipe("qk-fc-norm", softcap=50.0, embed_ln=True, **TINY))
        x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            _, loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}

    ref_loss, ref_grads = step("reference")
    before = Counter(backend.LAUNCHES)
    loss, grads = step("auto")
    ran = {k for k in backend.LAUNCHES if backend.LAUNCHES[k] > before[k]}
    assert set(OURS) <= ran and {"fused_attention_fwd", "fused_attention_bwd_dq", "fused_attention_bwd_dkdv"} <= ran
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    # bf16 noise judged against the largest gradient (the k-norm bias's is ~0 in exact arithmetic).
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for n, g in grads.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), n
        assert (g - ref_grads[n]).abs().max().item() <= 0.05 * scale, n
