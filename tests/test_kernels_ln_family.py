"""The LayerNorm-family Triton kernels (layer_norm, fused_add_norm, fused_embedding) on CPU under
TRITON_INTERPRET=1: every output and every gradient against the op's reference, by SPEC.md's
tolerance rule, with backend.LAUNCHES proving that the kernels ran and nothing fell back."""

import dataclasses
import importlib
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stableblocks as sb
from stableblocks.kernels import backend, fused_add_norm, fused_embedding, layer_norm
from conftest import DEVICE
from tolerance import assert_within_tolerance

# What only the interpreter does: on CUDA a bad token id is a device assert, which ends the process's CUDA context.
cpu_only = pytest.mark.skipif(DEVICE != "cpu", reason="CPU-side behaviour (interpreter)")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def _view(t, layout):
    """The tensor an op sees: a contiguous leaf, a column slice of a wider one, or a transpose."""
    if t is None or layout == "contiguous":
        return t
    if layout == "sliced":  # leaf (..., d + 3): unit column stride, row stride d + 3
        return t[..., :-3]
    if layout == "transposed":  # leaf (T, B, d): no single row stride, needs one copy
        return t.transpose(0, 1)
    raise ValueError(layout)


def _leaf_shape(shape, layout):
    if layout == "sliced":
        return (*shape[:-1], shape[-1] + 3)
    if layout == "transposed":
        return (shape[1], shape[0], *shape[2:])
    return tuple(shape)


def _run(fn, call, tensors, grads_for):
    """call(fn, **leaves) -> outputs; returns (outputs, {leaf name: gradient})."""
    leaves = {k: v.detach().clone().requires_grad_(True) if v is not None and v.is_floating_point() else v
              for k, v in tensors.items()}
    outs = call(fn, **leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    names = [k for k, v in leaves.items() if v is not None and v.requires_grad]
    grads = torch.autograd.grad(outs, [leaves[k] for k in names], grads_for(outs))
    return outs, dict(zip(names, grads))


def check_op(op, call, tensors, dtype, launches, noncontig_grad=False, seed=0):
    """Runs `op` (the public function, backend as set) and its reference in `dtype` and in float64
    on the same inputs and output gradients, and judges every output and gradient."""
    module = importlib.import_module(f"stableblocks.kernels.{op}")
    gen = torch.Generator().manual_seed(seed)
    base = []  # one gradient per output, in `dtype`, made when the first run shows the shapes

    def grads_for(outs):
        for o in outs[len(base):]:
            shape = tuple(o.shape)
            if noncontig_grad and len(shape) > 1:  # a permuted tensor: no unit column stride
                base.append(torch.randn(shape[::-1], generator=gen).to(dtype).permute(*range(len(shape))[::-1]))
            else:
                base.append(torch.randn(shape, generator=gen).to(dtype))
        return [g.to(o.dtype) for g, o in zip(base, outs)]

    before = Counter(backend.LAUNCHES)
    kernel_outs, kernel_grads = _run(getattr(module, op), call, tensors, grads_for)
    ran = {name: backend.LAUNCHES[name] - before[name] for name in launches}
    assert all(n == 1 for n in ran.values()), f"expected one launch of each kernel, got {ran}"
    same_outs, same_grads = _run(module.reference, call, tensors, grads_for)
    as64 = {k: v.double() if v is not None and v.is_floating_point() else v for k, v in tensors.items()}
    oracle_outs, oracle_grads = _run(module.reference, call, as64, grads_for)
    for i, (k, s, o) in enumerate(zip(kernel_outs, same_outs, oracle_outs)):
        assert k.dtype == s.dtype and k.shape == s.shape, (i, k.dtype, s.dtype)
        assert_within_tolerance(k, s, o, k.dtype, "forward", f"{op} output {i}")
    assert kernel_grads.keys() == same_grads.keys()
    for name in kernel_grads:
        k, s, o = kernel_grads[name], same_grads[name], oracle_grads[name]
        assert k.dtype == tensors[name].dtype and k.shape == tensors[name].shape, name
        assert_within_tolerance(k, s, o, k.dtype, "grad", f"{op} d{name}")


def _rand(shape, dtype, scale=1.0, shift=0.0, gen=None):
    return (torch.randn(shape, generator=gen) * scale + shift).to(dtype)


def _weight_dtype(dtype, mode):
    return torch.float32 if mode == "fp32" else dtype


# ---- layer_norm ----

LN_CASES = [  # (x shape, layout, bias)
    ((1, 768), "contiguous", True),  # one row, GPT-2 width
    ((2, 1, 1000), "sliced", True),  # T = 1, width not a power of two, row stride
    ((3, 7, 33), "transposed", False),  # prime T, no bias, needs a copy
    ((5, 13, 64), "sliced", True),  # several tiles and partial-sum programs
]


# (activations, weights): each dtype alone, and fp32 weights beside half activations (autocast)
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
               (torch.float16, torch.float16), (torch.float16, torch.float32)]


@pytest.mark.parametrize("dtype, wdtype", DTYPE_PAIRS, ids=["fp32", "bf16", "bf16+fp32w", "fp16", "fp16+fp32w"])
@pytest.mark.parametrize("shape, layout, bias", LN_CASES)
def test_layer_norm(triton_backend, dtype, wdtype, shape, layout, bias):
    d = shape[-1]
    tensors = dict(x=_rand(_leaf_shape(shape, layout), dtype, 3.0, 1.0), w=_rand(d, wdtype, 1.0, 1.0),
                   b=_rand(d, wdtype) if bias else None)
    call = lambda fn, x, w, b: fn(_view(x, layout), w, b)  # noqa: E731
    check_op("layer_norm", call, tensors, dtype, ["layer_norm_fwd", "layer_norm_bwd"],
             noncontig_grad=layout == "transposed")


# ---- fused_add_norm ----

ADD_NORM_CASES = [  # (shape, layout of x, layout of z)
    ((1, 768), "contiguous", "sliced"),
    ((2, 1, 1000), "sliced", "contiguous"),
    ((3, 7, 33), "transposed", "sliced"),
    ((4, 11, 48), "contiguous", "contiguous"),
]


def _add_norm_call(post, nxt, layout_x, layout_z):
    def call(fn, x, z, w, b, nw, nb):
        return fn(_view(x, layout_x), _view(z, layout_z), w if post else None, b if post else None,
                  next_weight=nw if nxt else None, next_bias=nb if nxt else None)
    return call


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape, layout_x, layout_z", ADD_NORM_CASES)
@pytest.mark.parametrize("post, nxt", [(False, False), (False, True), (True, False), (True, True)],
                         ids=["add", "add+next", "post", "post+next"])
def test_fused_add_norm(triton_backend, dtype, shape, layout_x, layout_z, post, nxt):
    d = shape[-1]
    wdtype = torch.float32 if shape[-1] % 2 else dtype  # fp32 weights beside half activations too
    gen = torch.Generator().manual_seed(1)
    tensors = dict(x=_rand(_leaf_shape(shape, layout_x), dtype, gen=gen),
                   z=_rand(_leaf_shape(shape, layout_z), dtype, 4.0, 0.5, gen=gen),
                   w=_rand(d, wdtype, 1.0, 1.0, gen=gen) if post else None,
                   b=_rand(d, wdtype, gen=gen) if post else None,
                   nw=_rand(d, wdtype, 1.0, 1.0, gen=gen) if nxt else None,
                   nb=_rand(d, wdtype, gen=gen) if nxt else None)
    launches = ["fused_add_norm_fwd"] + (["fused_add_norm_bwd"] if post or nxt else [])
    check_op("fused_add_norm", _add_norm_call(post, nxt, layout_x, layout_z), tensors, dtype, launches,
             noncontig_grad=layout_x == "transposed")


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("post, nxt", [(False, True), (True, True), (True, False), (False, False)],
                         ids=["add+next", "post+next", "post", "add"])
def test_fused_add_norm_fp32_residual_beside_half_sublayer(triton_backend, low, post, nxt):
    """Autocast: the residual stream stays fp32 while the sub-layer's output is bf16/fp16; y and n
    come out fp32 and each gradient in its input's dtype."""
    d = 96
    gen = torch.Generator().manual_seed(2)
    tensors = dict(x=_rand((2, 7, d), torch.float32, gen=gen), z=_rand((2, 7, d), low, 4.0, 0.5, gen=gen),
                   w=_rand(d, torch.float32, 1.0, 1.0, gen=gen) if post else None,
                   b=_rand(d, torch.float32, gen=gen) if post else None,
                   nw=_rand(d, torch.float32, 1.0, 1.0, gen=gen) if nxt else None,
                   nb=_rand(d, torch.float32, gen=gen) if nxt else None)
    launches = ["fused_add_norm_fwd"] + (["fused_add_norm_bwd"] if post or nxt else [])
    check_op("fused_add_norm", _add_norm_call(post, nxt, "contiguous", "contiguous"), tensors, low, launches)
    if not nxt:  # y = x + f(z): the residual's gradient is dy itself, not rounded to z's dtype
        x = tensors["x"].clone().requires_grad_(True)
        y = fused_add_norm(x, tensors["z"], tensors["w"], tensors["b"])
        dy = torch.randn_like(y)
        y.backward(dy)
        assert x.grad.dtype == torch.float32 and torch.equal(x.grad, dy)


def test_add_without_norms_needs_no_backward_kernel(triton_backend):
    """y = x + z: dx = dz = dy, and no kernel reads dy to say so."""
    x, z = (torch.randn(3, 5, 16, requires_grad=True) for _ in range(2))
    before = Counter(backend.LAUNCHES)
    y = fused_add_norm(x, z)
    dy = torch.randn_like(y)
    dx, dz = torch.autograd.grad(y, [x, z], dy)
    assert backend.LAUNCHES["fused_add_norm_fwd"] == before["fused_add_norm_fwd"] + 1
    assert backend.LAUNCHES["fused_add_norm_bwd"] == before["fused_add_norm_bwd"]
    torch.testing.assert_close(y, x + z, rtol=0, atol=0)
    assert torch.equal(dx, dy) and torch.equal(dz, dy)


# ---- fused_embedding ----

EMBEDDING_CASES = [  # (B, T, vocab, d, layout of wte)
    (1, 1, 3, 768, "contiguous"),  # one row
    (2, 7, 3, 33, "sliced"),  # prime T, a tiny vocabulary: rows repeat a lot
    (3, 5, 50, 1000, "contiguous"),
    (5, 3, 4, 40, "contiguous"),  # batch larger than T: several batch slices per position
]


def _embedding_call(has_wpe, has_ln, scale, layout):
    def call(fn, idx, wte, wpe, lnw, lnb):
        return fn(idx, _view(wte, layout), wpe if has_wpe else None, scale=scale,
                  ln_weight=lnw if has_ln else None, ln_bias=lnb if has_ln else None)
    return call


def _embedding_tensors(B, T, V, d, dtype, layout, has_wpe, has_ln, wdtype, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return dict(idx=torch.randint(0, V, (B, T), generator=gen),
                wte=_rand(_leaf_shape((V, d), layout), dtype, gen=gen),
                wpe=_rand((T + 2, d), dtype, gen=gen) if has_wpe else None,
                lnw=_rand(d, wdtype, 1.0, 1.0, gen=gen) if has_ln else None,
                lnb=_rand(d, wdtype, gen=gen) if has_ln else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B, T, V, d, layout", EMBEDDING_CASES)
@pytest.mark.parametrize("variant", ["scaled", "ln", "ln+scale", "plain-no-wpe"])
def test_fused_embedding(triton_backend, dtype, B, T, V, d, layout, variant):
    has_ln, has_wpe = "ln" in variant, variant != "plain-no-wpe"
    scale = math.sqrt(d) if "scale" in variant else 1.0
    wdtype = torch.float32 if d % 2 else dtype
    tensors = _embedding_tensors(B, T, V, d, dtype, layout, has_wpe, has_ln, wdtype)
    check_op("fused_embedding", _embedding_call(has_wpe, has_ln, scale, layout), tensors, dtype,
             ["fused_embedding_fwd", "fused_embedding_bwd"], noncontig_grad=B > 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("has_ln", [True, False], ids=["ln", "no-ln"])
def test_embedding_backward_with_long_runs_of_one_token(triton_backend, dtype, has_ln):
    B, T, V, d = 5, 7, 2, 33  # ~17 occurrences per token, summed in sorted order
    tensors = _embedding_tensors(B, T, V, d, dtype, "sliced", True, has_ln, torch.float32)
    check_op("fused_embedding", _embedding_call(True, has_ln, 2.0, "sliced"), tensors, dtype,
             ["fused_embedding_fwd", "fused_embedding_bwd"])


@cpu_only  # the byte counts are taken under the interpreter
def test_embedding_backward_writes_each_gradient_row_once(triton_backend):
    """d wte and d wpe: every row written once, in the parameter's dtype (bf16 here), by the
    kernels; no dense fp32 buffer, no zero fill, no cast afterwards."""
    from benchmarks.bytes_moved import AtenTraffic, TritonTraffic

    V, d = 9, 24
    # Token 0 four times, 1 and 2 twice, 3 to 7 once, 8 never; the positions past T = 5 get none.
    idx = torch.tensor([[0, 1, 3, 0, 4], [2, 0, 5, 6, 1], [7, 2, 0, 3, 3]])
    wte = torch.randn(V, d, dtype=torch.bfloat16, requires_grad=True)
    wpe = torch.randn(7, d, dtype=torch.bfloat16, requires_grad=True)
    e = fused_embedding(idx, wte, wpe, scale=2.0)
    de = torch.randn_like(e)
    with TritonTraffic() as kernels, AtenTraffic() as aten:
        dwte, dwpe = torch.autograd.grad(e, [wte, wpe], de)
    written, unique = Counter(), Counter()
    for launch in kernels.launches:
        for name, arg in launch.args.items():
            written[name] += arg.write
            unique[name] += arg.write_unique
    assert written["DWTE"] == unique["DWTE"] == V * d * 2
    assert written["DWPE"] == unique["DWPE"] == 7 * d * 2
    # The launcher's own torch ops touch token ids only (sort, run starts), never a (V, d) buffer.
    assert max(o.read + o.write for o in aten.ops) < V * d * 2, aten.by_op()
    want_wte = torch.zeros(V, d, dtype=torch.float64).index_add_(0, idx.reshape(-1), de.double().reshape(-1, d) * 2)
    torch.testing.assert_close(dwte.double(), want_wte, rtol=1e-2, atol=1e-2)
    assert torch.equal(dwte[8], torch.zeros(d, dtype=torch.bfloat16)) and torch.equal(dwpe[5:], torch.zeros(2, d, dtype=torch.bfloat16))


def test_embedding_backward_ignores_the_deterministic_switch(triton_backend):
    """One atomic-free path: the same bits with torch's deterministic switch on and off."""
    idx = torch.randint(0, 3, (6, 9))
    wte, wpe, lnw, lnb = torch.randn(3, 24), torch.randn(9, 24), torch.randn(24), torch.randn(24)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (wte, wpe, lnw, lnb)]
        e = fused_embedding(idx, leaves[0], leaves[1], scale=3.0, ln_weight=leaves[2], ln_bias=leaves[3])
        return torch.autograd.grad(e, leaves, torch.ones_like(e) + torch.arange(24.0))

    free = grads()
    torch.use_deterministic_algorithms(True)
    try:
        switched = grads()
    finally:
        torch.use_deterministic_algorithms(False)
    for a, s in zip(free, switched):
        assert torch.equal(a, s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the interpreter runs programs serially")
def test_gradients_repeat_bitwise_on_gpu():
    sb.set_backend("triton")
    dev = "cuda"
    idx = torch.randint(0, 7, (16, 512), device=dev)  # 7 tokens: every row of d wte has ~1000 adds
    wte, wpe = torch.randn(7, 768, device=dev), torch.randn(512, 768, device=dev)
    lnw, lnb = torch.randn(768, device=dev), torch.randn(768, device=dev)
    z = torch.randn(16, 512, 768, device=dev, dtype=torch.bfloat16)
    nw, nb = torch.randn(768, device=dev), torch.randn(768, device=dev)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (wte, wpe, lnw, lnb, nw, nb)]
        e = fused_embedding(idx, leaves[0], leaves[1], scale=27.7, ln_weight=leaves[2], ln_bias=leaves[3])
        y, n = fused_add_norm(e.bfloat16(), z, next_weight=leaves[4], next_bias=leaves[5])
        out = layer_norm(n, leaves[4], leaves[5])
        return torch.autograd.grad((y.float() * out.float()).sum(), leaves)

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---- property-based: any shape, dtype, scale and layout ----

@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    op=st.sampled_from(["layer_norm", "fused_add_norm", "fused_embedding"]),
    B=st.integers(1, 4), T=st.integers(1, 9), d=st.sampled_from([1, 2, 7, 32, 33, 100, 130, 768]),
    dtype=st.sampled_from(DTYPES), wmode=st.sampled_from(["same", "fp32"]),
    layout=st.sampled_from(["contiguous", "sliced", "transposed"]),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    scale=st.floats(0.25, 40.0), shift=st.floats(-3.0, 3.0), seed=st.integers(0, 2**16),
)
def test_any_shape_matches_reference(triton_backend, op, B, T, d, dtype, wmode, layout, flags, scale, shift, seed):
    wdtype = _weight_dtype(dtype, wmode)
    gen = torch.Generator().manual_seed(seed)
    a, b, c = flags
    if op == "layer_norm":
        tensors = dict(x=_rand(_leaf_shape((B, T, d), layout), dtype, scale, shift, gen), w=_rand(d, wdtype, gen=gen),
                       b=_rand(d, wdtype, gen=gen) if a else None)
        call = lambda fn, x, w, b: fn(_view(x, layout), w, b)  # noqa: E731
        launches = ["layer_norm_fwd", "layer_norm_bwd"]
    elif op == "fused_add_norm":
        post, nxt = a, b
        tensors = dict(x=_rand(_leaf_shape((B, T, d), layout), dtype, gen=gen),
                       z=_rand((B, T, d), dtype, scale, shift, gen),
                       w=_rand(d, wdtype, gen=gen) if post else None,
                       b=_rand(d, wdtype, gen=gen) if post and c else None,
                       nw=_rand(d, wdtype, gen=gen) if nxt else None,
                       nb=_rand(d, wdtype, gen=gen) if nxt and c else None)
        call = _add_norm_call(post, nxt, layout, "contiguous")
        launches = ["fused_add_norm_fwd"] + (["fused_add_norm_bwd"] if post or nxt else [])
    else:
        has_wpe, has_ln = a, b
        V = 1 + seed % 9
        wte_layout = "sliced" if layout == "sliced" else "contiguous"
        tensors = _embedding_tensors(B, T, V, d, dtype, wte_layout, has_wpe, has_ln, wdtype, seed)
        tensors["lnb"] = tensors["lnb"] if c else None
        call = _embedding_call(has_wpe, has_ln, scale, wte_layout)
        launches = ["fused_embedding_fwd", "fused_embedding_bwd"]
    check_op(op, call, tensors, dtype, launches, noncontig_grad=layout == "transposed", seed=seed)


# ---- edge cases and bad input ----

def test_bias_may_be_the_weight_tensor(triton_backend):
    x, w = torch.randn(3, 24), torch.randn(24)
    torch.testing.assert_close(layer_norm(x, w, w), F.layer_norm(x, (24,), w, w), rtol=1e-5, atol=1e-5)


def test_empty_rows(triton_backend):
    x = torch.randn(0, 5, 16, requires_grad=True)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    y = layer_norm(x, w, b)
    assert y.shape == x.shape
    dx, dw, db = torch.autograd.grad(y.sum(), [x, w, b])
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros(16)) and torch.equal(db, torch.zeros(16))
    y, n = fused_add_norm(x, x * 2, w, b, next_weight=w, next_bias=b)
    assert y.shape == n.shape == x.shape


def _ids(*rows):
    return torch.tensor(rows)


@pytest.mark.parametrize("make, match", [
    pytest.param(lambda: fused_embedding(_ids([0, 5]), torch.randn(5, 8)), r"idx: token ids must lie in \[0, 5\)",
                 marks=cpu_only),
    pytest.param(lambda: fused_embedding(_ids([-1, 2]), torch.randn(5, 8)), r"idx: token ids must lie", marks=cpu_only),
    (lambda: fused_embedding(_ids([0, 1]), torch.randn(5, 8), torch.randn(4, 8).double()), "wpe: expected the dtype"),
    (lambda: fused_embedding(_ids([0, 1]), torch.randn(5, 8), torch.randn(4, 9)), r"wpe: expected shape \(block_size, 8"),
    (lambda: fused_embedding(_ids([0, 1]), torch.randn(5, 8).double()), "wte: the Triton kernels take float32"),
    (lambda: layer_norm(torch.randn(2, 8).double(), torch.ones(8)), "x: the Triton kernels take float32"),
    (lambda: fused_add_norm(torch.randn(2, 8), torch.randn(2, 8).double()), "z: the Triton kernels take float32"),
    (lambda: layer_norm(torch.randn(2, 8), torch.ones(7)), r"layer_norm weight: expected shape \(8,\)"),
    (lambda: layer_norm(torch.randn(2, 8), torch.ones(8, device="meta")), f"weight: expected a tensor on {DEVICE}"),
    (lambda: layer_norm(torch.randn(1, 4097), torch.ones(4097)), "x: width 4097 exceeds"),
    (lambda: fused_add_norm(torch.randn(2, 8), torch.randn(2, 7)), "z: expected the shape of x"),
    (lambda: fused_add_norm(torch.randn(2, 8), torch.randn(2, 8), None, torch.ones(8)), "a bias was given without"),
])
def test_bad_input_is_a_value_error_before_launch(triton_backend, make, match):
    before = Counter(backend.LAUNCHES)
    with pytest.raises(ValueError, match=match):
        make()
    assert backend.LAUNCHES == before


@cpu_only
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need CUDA tensors, or TRITON_INTERPRET=1"):
        torch.ops.stableblocks.layer_norm_fwd(torch.randn(2, 8), torch.ones(8), None, 1e-5)


# ---- torch.compile: the ops are opaque custom ops, so fullgraph works without a GPU driver ----

def _ops(idx, wte, wpe, lnw, lnb, z, nw, nb):
    # Every optional part absent somewhere: the ops then return empty placeholders, which the
    # fake implementations must describe exactly.
    e = fused_embedding(idx, wte, wpe, scale=2.0, ln_weight=lnw, ln_bias=lnb) + fused_embedding(idx, wte)
    h = fused_add_norm(e, z, lnw, lnb)  # post-norm only
    y, n = fused_add_norm(h, z, next_weight=nw, next_bias=nb)  # next norm only
    return layer_norm(y + n, nw)  # no bias


@pytest.mark.parametrize("which", ["triton", "reference"])
def test_compile_fullgraph_forward_and_backward(which):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 5, (2, 3), generator=gen)
    args = [torch.randn(s, generator=gen) for s in ((5, 16), (4, 16), (16,), (16,), (2, 3, 16), (16,), (16,))]

    def run(fn):
        leaves = [a.clone().requires_grad_() for a in args]
        out = fn(idx, *leaves)
        return (out, *torch.autograd.grad((out * torch.arange(16.0)).sum(), leaves))

    sb.set_backend("reference")
    eager = run(_ops)
    sb.set_backend(which)
    before = Counter(backend.LAUNCHES)
    compiled = run(torch.compile(_ops, fullgraph=True))
    launched = {k: backend.LAUNCHES[k] - before[k] for k in
                ("fused_embedding_fwd", "fused_add_norm_fwd", "layer_norm_fwd", "layer_norm_bwd",
                 "fused_add_norm_bwd", "fused_embedding_bwd")}
    want = dict(fused_embedding_fwd=2, fused_add_norm_fwd=2, layer_norm_fwd=1, layer_norm_bwd=1,
                fused_add_norm_bwd=2, fused_embedding_bwd=2)
    assert launched == (want if which == "triton" else dict.fromkeys(want, 0)), launched
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


# ---- ahead-of-time compilation for sm_80 / sm_90a: no GPU needed, only a child without the interpreter ----

KERNEL_MODULES = ("layer_norm_triton", "fused_add_norm_triton", "fused_embedding_triton")
LAUNCHED_KERNELS = {"_layer_norm_fwd", "_layer_norm_bwd", "_add_norm_fwd", "_add_norm_bwd", "_embedding_fwd",
                    "_embedding_bwd", "_embedding_bwd_tokens"}


def _aot_jobs():
    jobs = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"stableblocks.kernels.{name}")
        # fp32 activations at every width (the most registers); bf16 at the widest, where the
        # rounding to nearest even adds its integer ops.
        for job in module.aot_configs() + module.aot_configs(widths=(4096,), act="bf16"):
            jobs += [dataclasses.replace(job, arch=arch) for arch in (80, 90)]
    return [job for i, job in enumerate(jobs) if job not in jobs[:i]]  # 768 and 1024 share a tile: once


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90a_without_spills(aot):
    jobs = _aot_jobs()
    assert {job.kernel for job in jobs} == LAUNCHED_KERNELS
    stats = aot.compile_jobs_in_subprocess(jobs)
    print("\n" + aot.format_report(stats))
    assert {(s.kernel, s.arch) for s in stats} == {(k, a) for k in LAUNCHED_KERNELS for a in ("sm_80", "sm_90a")}
    spilled = [(s.kernel, s.arch, s.constexprs, s.spill_stores, s.spill_loads) for s in stats
               if s.spill_stores or s.spill_loads]
    assert not spilled, spilled
    for s in stats:
        assert 0 < s.registers <= 255 and s.occupancy > 0


def test_auto_takes_the_reference_for_inputs_the_kernels_do_not_take():
    """float64, and rows wider than the kernels' registers hold: "triton" raises (above), "auto"
    quietly computes them with the reference."""
    sb.set_backend("auto")
    before = Counter(backend.LAUNCHES)
    x64 = torch.randn(2, 8, dtype=torch.float64)
    assert layer_norm(x64, torch.ones(8, dtype=torch.float64)).dtype == torch.float64
    wide = torch.randn(2, 4097)
    torch.testing.assert_close(layer_norm(wide, torch.ones(4097)), F.layer_norm(wide, (4097,)))
    y = fused_add_norm(torch.randn(2, 8), x64.clone())
    assert y.dtype == torch.float64
    assert backend.LAUNCHES == before
