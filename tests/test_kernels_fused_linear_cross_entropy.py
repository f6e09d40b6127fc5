"""fused_linear_cross_entropy: the chunked reference and the Triton kernels (CPU, TRITON_INTERPRET=1)
against the float64 materialising formula by SPEC.md's tolerance rule, at odd sizes, with chunks
small enough that every path crosses several of them."""

import sys
from collections import Counter

import pytest
import torch

import stableblocks as sb
from stableblocks.kernels import backend, fused_linear_cross_entropy
from tolerance import assert_within_tolerance

flce = sys.modules["stableblocks.kernels.fused_linear_cross_entropy"]
flce_triton = sys.modules["stableblocks.kernels.fused_linear_cross_entropy_triton"]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
BACKENDS = ["reference", "triton"]
N, D, V = 37, 40, 101  # prime N and V; d crosses the interpreter's 16-wide tiles with a remainder
CAP = 2.0  # the logits here have std ~2: the tanh is in its non-linear range


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # The reference then takes 4 rows per chunk, the Triton backward 16: both cross several chunks.
    monkeypatch.setattr(flce, "_REFERENCE_CHUNK", 4 * V)
    monkeypatch.setattr(flce_triton, "CHUNK_ELEMENTS", 16 * V)


def _inputs(dtype, n=N, vocab=V, bias=False, layout="contiguous", seed=0, ignore_every=5, width=D):
    gen = torch.Generator().manual_seed(seed)
    if layout == "sliced":  # unit column stride, row stride d + 3
        hidden = torch.randn(n, width + 3, generator=gen).to(dtype)[:, :width]
    elif layout == "transposed":  # (T, B, d) seen as (B, T, d): needs a copy
        hidden = torch.randn(n // 3, 3, width, generator=gen).to(dtype).transpose(0, 1)
    else:
        hidden = torch.randn(n, width, generator=gen).to(dtype)
    weight = torch.randn(vocab, width, generator=gen) * 0.3
    b = torch.randn(vocab, generator=gen) if bias else None
    targets = torch.randint(0, vocab, hidden.shape[:-1], generator=gen)
    if ignore_every:
        targets.view(-1)[::ignore_every] = flce.IGNORE_INDEX
    return dict(hidden=hidden, weight=weight.to(dtype), bias=None if b is None else b.to(dtype),
                targets=targets)


def _same_layout(t):
    """A fresh leaf with t's values and strides (clone() makes a sliced view contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t.detach())


def _loss_and_grads(fn, inputs, **kw):
    leaves = {k: _same_layout(v).requires_grad_(True) if k != "targets" and v is not None else v
              for k, v in inputs.items()}
    loss = fn(leaves["hidden"], leaves["weight"], leaves["targets"], leaves["bias"], **kw)
    wrt = [k for k in ("hidden", "weight", "bias") if leaves[k] is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in wrt])
    return loss, dict(zip(wrt, grads))


def _as64(inputs):
    return {k: v.double() if v is not None and v.is_floating_point() else v for k, v in inputs.items()}


def _judge(inputs, dtype, which, **kw):
    """The op (backend `which`) vs the eager formula in dtype, both against it in float64."""
    sb.set_backend(which)
    before = Counter(backend.LAUNCHES)
    loss, grads = _loss_and_grads(fused_linear_cross_entropy, inputs, **kw)
    launched = backend.LAUNCHES["fused_linear_cross_entropy_fwd"] - before["fused_linear_cross_entropy_fwd"]
    assert launched == (which == "triton")
    same_loss, same_grads = _loss_and_grads(flce.materialising, inputs, **kw)
    oracle_loss, oracle_grads = _loss_and_grads(flce.materialising, _as64(inputs), **kw)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_within_tolerance(loss, same_loss, oracle_loss, dtype, "forward", f"{which} loss")
    assert grads.keys() == oracle_grads.keys()
    for name, g in grads.items():
        assert g.dtype == inputs[name].dtype and g.shape == inputs[name].shape
        assert_within_tolerance(g, same_grads[name], oracle_grads[name], dtype, "grad", f"{which} d {name}")
    return loss, grads


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("options", ["plain", "cap+z+bias", "cap", "z"])
def test_matches_the_float64_oracle(which, dtype, options):
    kw = dict(softcap=CAP if "cap" in options else None, z_loss=1e-2 if "z" in options else 0.0)
    _judge(_inputs(dtype, bias="bias" in options), dtype, which, **kw)


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpt2_width_with_a_prime_count_of_tokens(which, dtype):
    # d = 768 (GPT-2's width: several BLOCK_D steps, not a power of two), 7 tokens, a partial vocab tile.
    _judge(_inputs(dtype, n=7, vocab=37, width=768, bias=True), dtype, which, softcap=CAP, z_loss=1e-3)


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_non_contiguous_hidden(which, layout):
    inputs = _inputs(torch.bfloat16, n=36, layout=layout)
    assert not inputs["hidden"].is_contiguous()
    _judge(inputs, torch.bfloat16, which, softcap=CAP)


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 17])
def test_few_tokens_and_sum_reduction(which, n):
    inputs = _inputs(torch.float32, n=n, ignore_every=2 if n > 1 else 0)
    _judge(inputs, torch.float32, which, z_loss=1e-3, reduction="sum")


@pytest.mark.parametrize("which", BACKENDS)
def test_vocab_of_one_and_of_gpt2_shape_remainders(which):
    # V = 1: every logit tile is one real column plus masked lanes; V = 97: a partial last tile.
    for vocab in (1, 97):
        _judge(_inputs(torch.float32, vocab=vocab), torch.float32, which, softcap=CAP)


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tied_weight_gradient_sums_both_paths(which, dtype):
    """hidden comes from the same (V, d) matrix the head uses (a tied token embedding): its
    gradient is the embedding's scatter plus the head's d weight."""
    inputs = _inputs(dtype)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, V, (N,), generator=gen)
    mix = torch.randn(D, D, generator=gen) / D ** 0.5

    def model(fn, wte, targets):
        hidden = torch.tanh(wte[idx].float() @ mix).to(wte.dtype)  # a stand-in for the blocks
        return fn(hidden, wte, targets, None, softcap=CAP, z_loss=1e-2)

    def run(fn, wte):
        wte = wte.detach().clone().requires_grad_(True)
        loss = model(fn, wte, inputs["targets"])
        return loss, torch.autograd.grad(loss, wte)[0]

    sb.set_backend(which)
    loss, grad = run(fused_linear_cross_entropy, inputs["weight"])
    same_loss, same_grad = run(flce.materialising, inputs["weight"])
    oracle_loss, oracle_grad = run(flce.materialising, inputs["weight"].double())
    assert_within_tolerance(loss, same_loss, oracle_loss, dtype, "forward", "tied loss")
    assert_within_tolerance(grad, same_grad, oracle_grad, dtype, "grad", "tied d wte")
    # Both paths contribute: the head's gradient alone misses the embedding rows' share.
    head = inputs["weight"].double().requires_grad_(True)
    hidden = torch.tanh(inputs["weight"].double()[idx] @ mix.double())
    head_only = torch.autograd.grad(flce.materialising(hidden, head, inputs["targets"], softcap=CAP, z_loss=1e-2),
                                    head)[0]
    assert (head_only - oracle_grad).abs().max() > 100 * (grad.double() - oracle_grad).abs().max()


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
def test_all_targets_ignored_gives_zero_loss_and_zero_gradients(which, bias):
    inputs = _inputs(torch.float32, bias=bias)
    inputs["targets"].fill_(-1)
    sb.set_backend(which)
    for reduction in ("mean", "sum"):
        loss, grads = _loss_and_grads(fused_linear_cross_entropy, inputs, ignore_index=-1, softcap=CAP,
                                      z_loss=1e-2, reduction=reduction)
        assert loss.item() == 0.0
        for g in grads.values():
            assert torch.equal(g, torch.zeros_like(g))
    # The deliberate difference from the eager formula, which divides by zero kept tokens:
    assert flce.materialising(inputs["hidden"], inputs["weight"], inputs["targets"], ignore_index=-1).isnan()


@pytest.mark.parametrize("which", BACKENDS)
def test_ignored_rows_take_no_part(which):
    """Changing an ignored token's hidden state changes neither the loss nor other gradients."""
    inputs = _inputs(torch.float32)
    sb.set_backend(which)
    loss, grads = _loss_and_grads(fused_linear_cross_entropy, inputs, softcap=CAP, z_loss=1e-2)
    moved = dict(inputs, hidden=inputs["hidden"].clone())
    moved["hidden"][0] += 100.0  # row 0 is ignored
    loss2, grads2 = _loss_and_grads(fused_linear_cross_entropy, moved, softcap=CAP, z_loss=1e-2)
    assert loss2.item() == loss.item()
    assert torch.equal(grads2["hidden"][0], torch.zeros(D)) and torch.equal(grads2["hidden"], grads["hidden"])
    torch.testing.assert_close(grads2["weight"], grads["weight"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("which", BACKENDS)
def test_d_weight_is_deterministic(which):
    inputs = _inputs(torch.bfloat16, n=70, bias=True)
    sb.set_backend(which)
    first = _loss_and_grads(fused_linear_cross_entropy, inputs, softcap=CAP, z_loss=1e-2)
    again = _loss_and_grads(fused_linear_cross_entropy, inputs, softcap=CAP, z_loss=1e-2)
    assert torch.equal(first[0], again[0])
    for name in first[1]:
        assert torch.equal(first[1][name], again[1][name]), name


@pytest.mark.parametrize("which", BACKENDS)
def test_mixed_precision_weight(which):
    """bf16 activations with fp32 weights (autocast's mix): fp32 loss, d weight in fp32."""
    inputs = _inputs(torch.bfloat16)
    inputs["weight"] = inputs["weight"].float()
    sb.set_backend(which)
    loss, grads = _loss_and_grads(fused_linear_cross_entropy, inputs, softcap=CAP)
    oracle_loss, oracle_grads = _loss_and_grads(flce.materialising, _as64(inputs), softcap=CAP)
    assert grads["weight"].dtype == torch.float32 and grads["hidden"].dtype == torch.bfloat16
    assert abs(loss.item() - oracle_loss.item()) < 2e-2
    assert (grads["weight"].double() - oracle_grads["weight"]).abs().max() < 2e-2


@pytest.mark.parametrize("which", BACKENDS)
def test_diagnostics(which):
    inputs = _inputs(torch.float32, bias=True)
    sb.set_backend(which)
    loss, diag = fused_linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["targets"], inputs["bias"],
                                            softcap=CAP, return_diagnostics=True)
    kept = inputs["targets"] != flce.IGNORE_INDEX
    u = (inputs["hidden"].double() @ inputs["weight"].double().T + inputs["bias"].double())[kept]
    lse = torch.logsumexp(CAP * torch.tanh(u / CAP), dim=-1)
    torch.testing.assert_close(diag.lse_mean.double(), lse.mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(diag.lse_sq_mean.double(), (lse ** 2).mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(diag.max_abs_logit.double(), u.abs().max(), rtol=1e-5, atol=1e-5)
    assert not diag.lse_mean.requires_grad


def test_bad_input_is_a_clear_error():
    inputs = _inputs(torch.float32)
    h, w, t = inputs["hidden"], inputs["weight"], inputs["targets"]
    for targets, match in ((torch.full_like(t, V), rf"targets: expected values in \[0, {V}\)"),
                           (torch.full_like(t, -1), rf"\[0, {V}\) or ignore_index=-100, got -1"),
                           (t.float(), "targets: expected an int64 or int32"),
                           (t[:-1], "targets: expected shape")):
        with pytest.raises(ValueError, match=match):
            fused_linear_cross_entropy(h, w, targets)
    for kwargs, match in ((dict(softcap=0.0), "softcap"), (dict(z_loss=-1.0), "z_loss"),
                          (dict(reduction="none"), "reduction"), (dict(ignore_index=1.5), "ignore_index")):
        with pytest.raises(ValueError, match=match):
            fused_linear_cross_entropy(h, w, t, **kwargs)
    for args, match in (((h, w[:, :-1], t), r"weight: expected shape \(vocab, 40\)"),
                        ((h, w, t, torch.zeros(V + 1)), "bias: expected shape"),
                        ((h[0], w, t[0]), "hidden: expected shape"),
                        ((h.long(), w, t), "hidden: expected a float")):
        with pytest.raises(ValueError, match=match):
            fused_linear_cross_entropy(*args)


def test_triton_backend_refuses_float64(triton_backend):
    inputs = _as64(_inputs(torch.float32))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        fused_linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["targets"])


@pytest.mark.parametrize("which", BACKENDS)
def test_compile_fullgraph_matches_eager_with_ignore_index(which):
    inputs = _inputs(torch.bfloat16, n=24, bias=True, ignore_every=3)
    sb.set_backend(which)

    def fn(hidden, weight, targets, bias, **kw):
        return fused_linear_cross_entropy(hidden * 1.5, weight, targets, bias, **kw)

    kw = dict(softcap=CAP, z_loss=1e-2)
    eager = _loss_and_grads(fn, inputs, **kw)
    before = Counter(backend.LAUNCHES)
    compiled = _loss_and_grads(torch.compile(fn, fullgraph=True), inputs, **kw)
    assert backend.LAUNCHES["fused_linear_cross_entropy_bwd"] > before["fused_linear_cross_entropy_bwd"] or which != "triton"
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    for name in eager[1]:
        torch.testing.assert_close(compiled[1][name], eager[1][name], rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_aot_compiles_without_spills_on_tensor_cores(aot):
    jobs = flce_triton.aot_configs()
    assert {(j.kernel, j.arch) for j in jobs} == {(k, a) for k in ("_linear_cross_entropy_fwd", "_linear_cross_entropy_bwd_logits", "_linear_cross_entropy_matmul")
                                                  for a in (80, 90)}
    stats = aot.compile_jobs_in_subprocess(jobs)
    report = aot.format_report(stats)
    for job, s in zip(jobs, stats):
        what = f"{s.kernel} {job.signature} {s.arch}"
        assert s.spill_stores == s.spill_loads == 0, f"{what} spills:\n{report}"
        assert s.tensor_core, f"{what}: no HMMA/HGMMA:\n{report}"
        assert 0 < s.registers <= 255
