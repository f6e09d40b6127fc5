"""The backend switch: "auto" takes the reference for every input a kernel cannot take, "triton"
raises for it; arguments are validated at the op boundary the same way on every backend."""

from collections import Counter

import pytest
import torch

import stableblocks as sb
from stableblocks.kernels import backend, fused_add_norm, fused_attention, fused_embedding, layer_norm
from stableblocks.kernels.fused_add_norm import reference as add_norm_reference
from stableblocks.kernels.fused_attention import reference as attention_reference
from stableblocks.kernels.fused_embedding import reference as embedding_reference
from stableblocks.kernels.layer_norm import reference as layer_norm_reference


def _t(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()


def _ids():
    return torch.tensor([[0, 3, 1], [2, 2, 4]])


# op name -> (the public op, its reference, a builder of inputs the kernel cannot take)
UNSUPPORTED = {
    "layer_norm float64": (layer_norm, layer_norm_reference, lambda: ((_t(3, 8, dtype=torch.float64), _t(8)), {})),
    "layer_norm width 0": (layer_norm, layer_norm_reference, lambda: ((_t(3, 0), _t(0)), {})),
    "layer_norm width 4097": (layer_norm, layer_norm_reference, lambda: ((_t(2, 4097), _t(4097)), {})),
    "fused_add_norm float64 z": (fused_add_norm, add_norm_reference,
                                 lambda: ((_t(2, 8), _t(2, 8, dtype=torch.float64), _t(8), _t(8)), {})),
    "fused_add_norm width 0": (fused_add_norm, add_norm_reference,
                               lambda: ((_t(2, 0), _t(2, 0)), {"next_weight": _t(0)})),
    "fused_embedding float64": (fused_embedding, embedding_reference,
                                lambda: ((_ids(), _t(5, 8, dtype=torch.float64), _t(4, 8, dtype=torch.float64)),
                                         {"ln_weight": _t(8)})),
    "fused_embedding width 0": (fused_embedding, embedding_reference, lambda: ((_ids(), _t(5, 0)), {})),
    "fused_attention float64": (fused_attention, attention_reference,
                                lambda: (tuple(_t(1, 5, 2, 16, dtype=torch.float64, seed=i) for i in range(3)),
                                         {"q_norm": (_t(16), _t(16))})),
    "fused_attention D=44": (fused_attention, attention_reference,
                             lambda: (tuple(_t(1, 5, 2, 44, seed=i) for i in range(3)), {"k_norm": (_t(44), None)})),
    "fused_attention float32 D=136": (fused_attention, attention_reference,
                                      lambda: (tuple(_t(1, 3, 1, 136, seed=i) for i in range(3)), {})),
    "fused_attention D=8": (fused_attention, attention_reference,
                            lambda: (tuple(_t(1, 5, 2, 8, seed=i) for i in range(3)), {})),
}


def _outputs_and_grads(fn, args, kwargs):
    out = fn(*args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    leaves = [t for t in (*args, *kwargs.values()) for t in (t if isinstance(t, tuple) else (t,))
              if isinstance(t, torch.Tensor) and t.requires_grad]
    loss = sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, leaves, allow_unused=True)


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_auto_takes_the_reference_where_the_kernel_cannot(case):
    op, reference, make = UNSUPPORTED[case]
    sb.set_backend("auto")
    before = Counter(backend.LAUNCHES)
    outs, grads = _outputs_and_grads(op, *make())
    assert backend.LAUNCHES == before, "a kernel launched"
    ref_outs, ref_grads = _outputs_and_grads(reference, *make())
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_triton_backend_raises_where_the_kernel_cannot(triton_backend, case):
    op, _, make = UNSUPPORTED[case]
    args, kwargs = make()
    before = Counter(backend.LAUNCHES)
    with pytest.raises(ValueError, match="backend 'auto' takes the reference"):
        op(*args, **kwargs)
    assert backend.LAUNCHES == before


def test_auto_still_takes_the_kernel_where_it_can():
    sb.set_backend("auto")
    before = Counter(backend.LAUNCHES)
    layer_norm(_t(2, 8), _t(8))
    fused_add_norm(_t(2, 8), _t(2, 8), _t(8))
    fused_embedding(_ids(), _t(5, 8))
    fused_attention(*(_t(1, 5, 2, 16, seed=i) for i in range(3)))
    launched = Counter(backend.LAUNCHES) - before
    assert {k for k in launched if k.endswith("fwd")} == {
        "layer_norm_fwd", "fused_add_norm_fwd", "fused_embedding_fwd", "fused_attention_fwd"}, launched


# ---- validation at the op boundary: the same error on every backend ----

def _attn(**kw):
    q = _t(1, 4, 2, 16)
    return fused_attention(q, q, q, **kw)


BAD = [
    (lambda: _attn(scale=0.0), r"scale: expected a finite float > 0"),
    (lambda: _attn(scale=-0.25), r"scale: expected a finite float > 0"),
    (lambda: _attn(scale=float("nan")), r"scale: expected a finite float > 0"),
    (lambda: _attn(softcap=float("inf")), r"softcap: expected a finite float > 0"),
    (lambda: _attn(softcap=0.0), r"softcap: expected a finite float > 0"),
    (lambda: fused_attention(*(_t(1, 4, 2, 0),) * 3), r"q: expected a head width D >= 1"),
    (lambda: _attn(eps=-1e-5), r"eps: expected a finite float >= 0"),
    (lambda: _attn(eps=float("nan")), r"eps: expected a finite float >= 0"),
    (lambda: layer_norm(_t(2, 8), _t(8), eps=-1.0), r"eps: expected a finite float >= 0"),
    (lambda: layer_norm(torch.tensor(1.0), torch.ones(1)), r"x: expected a tensor with at least one dimension"),
    (lambda: fused_add_norm(torch.tensor(1.0), torch.tensor(2.0)), r"x: expected a tensor with at least one dim"),
    (lambda: fused_add_norm(_t(2, 8), _t(2, 8), eps=float("inf")), r"eps: expected a finite float >= 0"),
    (lambda: fused_embedding(_ids(), _t(5, 8), eps=-1.0), r"eps: expected a finite float >= 0"),
]


@pytest.mark.parametrize("name", ["reference", "triton", "auto"])
@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_arguments_are_a_value_error_on_every_backend(name, i):
    make, match = BAD[i]
    sb.set_backend(name)
    before = Counter(backend.LAUNCHES)
    with pytest.raises(ValueError, match=match):
        make()
    assert backend.LAUNCHES == before
