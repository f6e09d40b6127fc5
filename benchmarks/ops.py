"""What the kernel benchmarks run: each op's cases, their inputs, and the providers that compute them.

A *case* is one op with one setting of its options (e.g. fused_add_norm with a post-norm and the
next pre-norm). A *provider* computes a case: "triton" (stableblocks' kernel), "eager" (the op's
plain-PyTorch reference, i.e. the composition a user would write), "compile" (torch.compile of
that reference) and, for attention, "sdpa", "flex" (FlexAttention with a soft-cap score_mod) and
"flash_attn" (if installed); for LayerNorm, "liger" (Liger-Kernel's, if installed). For
fused_linear_cross_entropy "eager" is the materialising formula (the (N, V) logits,
F.cross_entropy) and "reference" the op's chunked plain-PyTorch path. Every case also knows its unavoidable bytes (each input read once,
each output written once) and, for attention, its FLOPs.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from stableblocks.kernels import (backend, fused_add_norm, fused_attention, fused_embedding, fused_linear_cross_entropy,
                                  layer_norm)

MODES = ("forward", "backward", "forward+backward")
SOFTCAP = 50.0  # the qk-norm-cap recipe's cap


@dataclass(frozen=True)
class Shape:
    """B sequences of T tokens of width d; attention splits d into heads of width D."""

    B: int
    T: int
    d: int
    D: int = 64
    vocab: int = 50304  # fused_embedding and fused_linear_cross_entropy only

    @property
    def H(self) -> int:
        return self.d // self.D

    @property
    def tokens(self) -> int:
        return self.B * self.T


@dataclass(frozen=True)
class Case:
    op: str  # the kernel op's name, as in backend.KERNELS
    variant: str
    options: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.op}:{self.variant}"

    def shape_label(self, shape: Shape, dtype: torch.dtype, param_dtype: torch.dtype | None = None) -> str:
        parts = {"B": shape.B, "T": shape.T, "d": shape.d}
        if self.op == "fused_attention":
            parts = {"B": shape.B, "T": shape.T, "H": shape.H, "D": shape.D}
        if self.op == "fused_embedding":  # its activations are its tables' dtype
            parts["V"] = shape.vocab
            dtype = param_dtype or dtype
        if self.op == "fused_linear_cross_entropy":
            parts["V"] = shape.vocab
        label = " ".join(f"{k}={v}" for k, v in parts.items()) + f" {dtype_name(dtype)}"
        if param_dtype not in (None, dtype):
            label += f" params={dtype_name(param_dtype)}"
        return label

    def valid(self, shape: Shape) -> bool:
        return self.op != "fused_attention" or shape.d % shape.D == 0

    def has_kernel(self) -> bool:
        return self.op in backend.KERNELS


CASES = [
    Case("layer_norm", "affine"),
    # Embedding: Scaled Embed (token + position, x sqrt(d)) and Embed LN (token + position, then LN).
    Case("fused_embedding", "scaled", {"ln": False}),
    Case("fused_embedding", "ln", {"ln": True}),
    # Residual add with the next pre-norm (every pre-norm block), with the post-norm as well
    # (qk-fc-norm), and the post-norm at a block's end (no next norm inside the block).
    Case("fused_add_norm", "add+next", {"post": False, "next": True}),
    Case("fused_add_norm", "post+next", {"post": True, "next": True}),
    Case("fused_add_norm", "post", {"post": True, "next": False}),
    Case("fused_attention", "causal", {"norm": (), "softcap": None}),
    Case("fused_attention", "qk-norm-cap", {"norm": ("q", "k"), "softcap": SOFTCAP}),
    Case("fused_attention", "qkv-norm", {"norm": ("q", "k", "v"), "softcap": None}),
    # LM head + cross-entropy: hidden states (B, T, d), the head weight (vocab, d), targets.
    Case("fused_linear_cross_entropy", "plain"),
]
OPS = tuple(dict.fromkeys(c.op for c in CASES))


def cases(ops=None) -> list[Case]:
    """The cases of the named ops (names like "fused_attention" or "fused_attention:causal")."""
    if not ops:
        return list(CASES)
    known = {c.op for c in CASES} | {c.name for c in CASES}
    unknown = sorted(set(ops) - known)
    if unknown:
        raise ValueError(f"ops: unknown {unknown}; expected names from {sorted(known)}")
    return [c for c in CASES if c.op in ops or c.name in ops]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What GPU training runs (autocast): bf16 activations, fp32 weights.
TRAINING_DTYPE, TRAINING_PARAM_DTYPE = torch.bfloat16, torch.float32


# --- inputs -------------------------------------------------------------------------------------


@dataclass
class Inputs:
    args: tuple
    kwargs: dict
    leaves: list[torch.Tensor]  # the differentiable inputs, in a fixed order
    weights: list[torch.Tensor] = field(default_factory=list)  # those of them that are weights


def make_inputs(case: Case, shape: Shape, dtype: torch.dtype, device="cpu", seed: int = 0,
                param_dtype: torch.dtype | None = None) -> Inputs:
    """Random inputs, leaves requiring grad: activations in `dtype`, weights in `param_dtype`
    (default the same; fp32 weights with bf16 activations is autocast training). The embedding's
    tables are weights, and its token ids are distinct when the vocabulary allows."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    param_dtype = param_dtype or dtype
    weights = []

    def rand(*size, scale=1.0, shift=0.0, param=False):
        t = torch.randn(*size, generator=gen) * scale + shift
        t = t.to(device=device, dtype=param_dtype if param else dtype).requires_grad_()
        if param:
            weights.append(t)
        return t

    inputs = _make(case, shape, rand, gen, device)
    inputs.weights = weights
    return inputs


def _make(case: Case, shape: Shape, rand, gen, device) -> Inputs:
    B, T, d = shape.B, shape.T, shape.d
    o = case.options
    if case.op == "layer_norm":
        x, w, b = rand(B, T, d), rand(d, scale=0.1, shift=1.0, param=True), rand(d, scale=0.1, param=True)
        return Inputs((x, w, b), {}, [x, w, b])
    if case.op == "fused_embedding":
        if shape.vocab >= B * T:
            idx = torch.randperm(shape.vocab, generator=gen)[: B * T].view(B, T).to(device)
        else:
            idx = torch.randint(shape.vocab, (B, T), generator=gen).to(device)
        wte, wpe = rand(shape.vocab, d, scale=0.02, param=True), rand(T, d, scale=0.02, param=True)
        kwargs = {"scale": 1.0 if o["ln"] else math.sqrt(d)}
        leaves = [wte, wpe]
        if o["ln"]:
            kwargs["ln_weight"], kwargs["ln_bias"] = rand(d, scale=0.1, shift=1.0, param=True), rand(d, scale=0.1, param=True)
            leaves += [kwargs["ln_weight"], kwargs["ln_bias"]]
        return Inputs((idx, wte, wpe), kwargs, leaves)
    if case.op == "fused_add_norm":
        x, z = rand(B, T, d), rand(B, T, d)
        args, leaves, kwargs = [x, z], [x, z], {}
        if o["post"]:
            w, b = rand(d, scale=0.1, shift=1.0, param=True), rand(d, scale=0.1, param=True)
            args += [w, b]
            leaves += [w, b]
        if o["next"]:
            kwargs["next_weight"], kwargs["next_bias"] = rand(d, scale=0.1, shift=1.0, param=True), rand(d, scale=0.1, param=True)
            leaves += [kwargs["next_weight"], kwargs["next_bias"]]
        return Inputs(tuple(args), kwargs, leaves)
    if case.op == "fused_attention":
        H, D = shape.H, shape.D
        q, k, v = rand(B, T, H, D), rand(B, T, H, D), rand(B, T, H, D)
        kwargs = {"softcap": o["softcap"]}
        leaves = [q, k, v]
        for name in o["norm"]:
            pair = (rand(D, scale=0.1, shift=1.0, param=True), rand(D, scale=0.1, param=True))
            kwargs[f"{name}_norm"] = pair
            leaves += list(pair)
        return Inputs((q, k, v), kwargs, leaves)
    if case.op == "fused_linear_cross_entropy":
        h, w = rand(B, T, d), rand(shape.vocab, d, scale=0.02, param=True)
        targets = torch.randint(shape.vocab, (B, T), generator=gen).to(device)
        return Inputs((h, w, targets), {}, [h, w])
    raise ValueError(f"case: unknown op {case.op!r}")


# --- providers ----------------------------------------------------------------------------------

PUBLIC = {"layer_norm": layer_norm, "fused_embedding": fused_embedding, "fused_add_norm": fused_add_norm,
           "fused_attention": fused_attention, "fused_linear_cross_entropy": fused_linear_cross_entropy}
# The eager composition a user would write, where it is not the op's reference (which is chunked).
EAGER = {"fused_linear_cross_entropy": "materialising"}


def reference_fn(op: str):
    """The op's eager composition: its plain-PyTorch reference, or the formula it replaces."""
    return getattr(importlib.import_module(f"stableblocks.kernels.{op}"), EAGER.get(op, "reference"))


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def providers(case: Case, device: str) -> list[str]:
    names = ["triton", "eager", "compile"]
    if case.op in EAGER:
        names.insert(1, "reference")
    if case.op == "fused_attention":
        names += ["sdpa", "flex"]
        if device == "cuda" and flash_attn_available():
            names.append("flash_attn")
    if case.op == "layer_norm" and device == "cuda" and liger_available():
        names.append("liger")
    return names


class Unavailable(Exception):
    """A provider that cannot run this case here; the message says why (it is recorded, not faked)."""


def unavailable(case: Case, provider: str, device: str, mode: str) -> str | None:
    """Why `provider` cannot run `case` in `mode` on `device`, or None when it can."""
    if provider == "triton":
        if not case.has_kernel():
            return "no kernel yet"
        if device != "cuda":
            return "interpreter timings are not meaningful (CPU)"
    elif provider == "reference" and case.op not in EAGER:
        return "the eager provider is this op's reference"
    elif provider in ("sdpa", "flex", "flash_attn") and case.op != "fused_attention":
        return f"{provider} is an attention provider"
    elif provider == "sdpa" and case.options["softcap"] is not None:
        return "SDPA has no soft-cap"
    elif provider == "flex" and device != "cuda" and mode != "forward":
        return "FlexAttention has no backward on CPU"
    elif provider == "flash_attn" and not (device == "cuda" and flash_attn_available()):
        return "flash_attn is not installed" if device == "cuda" else "flash_attn needs CUDA"
    elif provider == "liger" and case.op != "layer_norm":
        return "Liger is compared on LayerNorm only"
    elif provider == "liger" and not (device == "cuda" and liger_available()):
        return "liger_kernel is not installed" if device == "cuda" else "Liger needs CUDA"
    elif provider not in ("reference", "eager", "compile", "sdpa", "flex", "flash_attn", "liger"):
        raise ValueError(f"provider: unknown {provider!r}")
    return None


def provider_fn(case: Case, provider: str, device: str):
    """A callable (*args, **kwargs) -> output(s) computing `case` with `provider`.

    Raises Unavailable when the provider cannot run the case here in any mode.
    """
    why = unavailable(case, provider, device, "forward")
    if why:
        raise Unavailable(why)
    if provider in ("triton", "reference"):
        public = PUBLIC[case.op]

        def public_fn(*args, **kwargs):
            with backend.using(provider):
                return public(*args, **kwargs)

        return public_fn
    if provider == "eager":
        return reference_fn(case.op)
    if provider == "compile":
        torch._dynamo.reset()  # a fresh cache for this case's shapes
        torch._functorch.config.donated_buffer = False  # step_fn replays one backward (retain_graph): no donation
        return torch.compile(reference_fn(case.op))
    if provider == "sdpa":
        return _with_norms(_sdpa)
    if provider == "flex":
        return _with_norms(_flex(case.options["softcap"], device))
    if provider == "liger":
        from liger_kernel.transformers.functional import liger_layer_norm

        return lambda x, w, b: liger_layer_norm(x, w, b, 1e-5)
    return _with_norms(_flash_attn)


def _with_norms(attend):
    """Apply the per-head q/k/v LayerNorms eagerly (F.layer_norm), then `attend` on (B, T, H, D)."""

    def fn(q, k, v, *, softcap=None, q_norm=None, k_norm=None, v_norm=None):
        q, k, v = (t if p is None else F.layer_norm(t, (t.shape[-1],), p[0].to(t.dtype), p[1].to(t.dtype))
                   for t, p in ((q, q_norm), (k, k_norm), (v, v_norm)))
        return attend(q, k, v, softcap)

    return fn


def _sdpa(q, k, v, softcap):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return o.transpose(1, 2)


def _flex(softcap, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def cap(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    def fn(q, k, v, _softcap):
        T = q.shape[1]
        if T not in masks:
            masks[T] = create_block_mask(causal, None, None, T, T, device=device)
        if device != "cuda":  # FlexAttention has no backward on CPU: time its forward on inputs without grad
            q, k, v = q.detach(), k.detach(), v.detach()
        o = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                     score_mod=None if softcap is None else cap, block_mask=masks[T])
        return o.transpose(1, 2)

    return fn


def _flash_attn(q, k, v, softcap):
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, causal=True, softcap=0.0 if softcap is None else softcap)


# --- unavoidable bytes and FLOPs ------------------------------------------------------------------


def unavoidable_bytes(case: Case, shape: Shape, dtype: torch.dtype, param_dtype: torch.dtype | None = None,
                      idx_bytes: int = 8) -> dict[str, int]:
    """Each input the math needs read once, each output written once, per pass.

    Backward reads the output gradients and whatever forward tensors the gradient formula needs
    (for LayerNorm the normalised input's source x, not the saved statistics, which could be
    recomputed), and writes each distinct input gradient once (x + z passes one gradient to both).
    """
    a, p = dtype.itemsize, (param_dtype or dtype).itemsize
    if case.op == "fused_embedding":
        a = p  # its output has its tables' dtype
    N, d = shape.tokens, shape.d
    act, vec = N * d * a, d * p
    o = case.options
    if case.op == "layer_norm":
        fwd = act + 2 * vec + act  # x, w, b -> y
        bwd = 2 * act + vec + act + 2 * vec  # dy, x, w -> dx, dw, db
    elif case.op == "fused_embedding":
        rows = shape.B * shape.T * idx_bytes + act + shape.T * d * p  # idx, wte[idx], wpe[:T]
        ln = 2 * vec if o["ln"] else 0
        fwd = rows + ln + act
        # de, idx, (for LN: the normalised input's source, one row per token) -> dwte (dense), dwpe, dw, db
        bwd = act + N * idx_bytes + (act + vec if o["ln"] else 0) + shape.vocab * d * p + shape.T * d * p + ln
    elif case.op == "fused_add_norm":
        post, nxt = o["post"], o["next"]
        fwd = 2 * act + (2 * vec if post else 0) + act + ((2 * vec + act) if nxt else 0)
        reads = act  # dy
        writes = 0
        if nxt:
            reads += act + act + vec  # dn, y (LN_next's input), w_next
            writes += 2 * vec
        if post:
            reads += act + vec  # z (the post-norm's input), w
            writes += act + act + 2 * vec  # dx and dz differ, dw, db
        else:
            writes += act  # dx == dz
        if post and not nxt:
            writes -= act  # dx is dy itself
        bwd = reads + writes
    elif case.op == "fused_attention":
        B, T, H, D = shape.B, shape.T, shape.H, shape.D
        t = B * T * H * D * a
        norms = 2 * D * p * len(o["norm"])
        lse = B * H * T * 4
        fwd = 3 * t + norms + t
        bwd = 5 * t + norms + lse + 3 * t + norms  # q, k, v, o, do, lse -> dq, dk, dv, d(norm params)
    elif case.op == "fused_linear_cross_entropy":
        w, targets = shape.vocab * d * p, N * idx_bytes
        fwd = act + w + targets + 4  # h, W, targets -> the fp32 loss
        bwd = 4 + act + w + targets + act + w  # d loss, h, W, targets -> d h, d W
    else:
        raise ValueError(f"case: unknown op {case.op!r}")
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}


def attention_flops(shape: Shape, causal: bool = True) -> dict[str, float]:
    """Matmul FLOPs (FlashAttention's convention): 4 B H T^2 D forward, halved when causal,
    2.5x that for backward."""
    fwd = 4 * shape.B * shape.H * shape.T ** 2 * shape.D * (0.5 if causal else 1.0)
    return {"forward": fwd, "backward": 2.5 * fwd, "forward+backward": 3.5 * fwd}


# --- running one mode ----------------------------------------------------------------------------


def as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def step_fn(fn, inputs: Inputs, mode: str):
    """A no-argument callable running `fn` in `mode` ("forward" keeps autograd's bookkeeping, as
    in training; "backward" replays the gradient of one recorded forward)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    call = functools.partial(fn, *inputs.args, **inputs.kwargs)
    if mode == "forward":
        return call
    outs = as_tuple(call())
    grads = [torch.randn_like(o) for o in outs]

    def backward(outs=outs):
        return torch.autograd.grad(outs, inputs.leaves, grads, retain_graph=True, allow_unused=True)

    if mode == "backward":
        return backward

    def forward_backward():
        return backward(as_tuple(call()))

    return forward_backward
