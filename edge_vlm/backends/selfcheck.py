"""Is this fast op right on this machine? One run on fresh random inputs against plain torch.

The Triton kernels and torch's int4 kernel are compiled for a GPU, driver and Triton version
this project may never have run. Each check here runs one kind of fast op once, on random inputs
shaped like the model's own (its own int4 layers, norms, head layout and rope tables), and
compares it with a reference computed in float32 (float64 for a float32 model) from the same
weights: a compile error, a launch error, a NaN or a mismatch fails it, with the reason.
backends/gpu_path.py decides what a failure switches to.

Tolerances. The kernel tests (tests/backends/test_kernels_*.py) bound every element by its worst case,
a few roundings of the dtype times the sum of |terms|; such bounds grow with K, the number of
terms summed, so on a real layer (K in the thousands) they would let a packing error through.
Here an op passes when its relative L2 error is below 16 unit roundoffs of the coarser of its
input and compute dtypes: the same roundings, which for random-sign inputs add up like their
sum, not their worst case (measured on the tests' shapes: 1-3 unit roundoffs). A wrong nibble
order, zero point, group or position gives errors of order 1, NaN is named as such. A whole
decode step through many layers is allowed 128 roundoffs (at most 1/8).

Cost: a handful of launches per op kind plus a one-token fused decode step and two recorded
(CUDA graph) steps on scratch caches of 8 positions; the reference layers are dequantized once,
at most ~16M weights each (larger ones, e.g. a big-vocabulary lm_head, are checked on their
first and last 512 output columns).
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .torch_engine import TorchEngine
from ..formats.int4_formats import dequantize_gemm
from ..models.llm import LayerNorm1P, RMSNorm
from ..models.quant_linear import WQLinear
from ..models.rotary import apply_rotary

UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24,
                 torch.float64: 2.0**-53}
DECODE_ROWS, PREFILL_ROWS = 1, 13  # a decode token (GEMV) and a ragged prefill block (GEMM)
FULL_CHECK_WEIGHTS = 1 << 24  # layers up to this size are checked on every output column
EDGE_COLUMNS = 512  # bigger ones on this many first and last columns
SEED = 0  # fixed: a check that fails does so on every load, reproducibly


@dataclass
class Check:
    """One op kind's outcome: `reason` says why it failed ('' when it passed); `raised`: it failed
    by an exception (a launch or CUDA error may have left the device unusable), not a wrong value."""
    op: str
    passed: bool
    reason: str = ""
    seconds: float = 0.0
    raised: bool = False


def tolerance(*dtypes: torch.dtype, roundoffs: int = 16) -> float:
    """Relative L2 error allowed: `roundoffs` unit roundoffs of the coarsest dtype, at most 1/8,
    plus fp32 accumulation noise (sqrt(K) 2^-24 for K up to 2^16 terms)."""
    return min(roundoffs * max(UNIT_ROUNDOFF[d] for d in dtypes), 0.125) + 2.0**-16


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def mismatch(got: torch.Tensor, want: torch.Tensor, tol: float) -> str | None:
    """Why `got` is not `want` within relative L2 error `tol` (None when it is)."""
    if tuple(got.shape) != tuple(want.shape):
        return f"wrong shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    got = got.to(want.dtype)
    if not bool(torch.isfinite(got).all()):
        return "NaN or inf in the output"
    err = float((got - want).norm() / want.norm().clamp_min(1e-30))
    return None if err <= tol else f"mismatch: relative error {err:.2g} > {tol:.2g}"


def run_check(op: str, fn: Callable[[], str | None], device: torch.device) -> Check:
    """Run one check; any exception (compile, launch, shape) is a failure with its first line."""
    start, raised = time.perf_counter(), False
    try:
        with torch.inference_mode():
            reason = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a launch error surfaces here at the latest
    except Exception as e:  # noqa: BLE001 - every failure of a fast op means: use the next path
        reason, raised = describe(e), True
    return Check(op, reason is None, reason or "", time.perf_counter() - start, raised)


def describe(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:200] if first else type(e).__name__


class Inputs:
    """Random tensors from a private generator (the user's RNG state is left alone)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int = SEED):
        self.device, self.dtype = device, dtype
        self.ref = reference_dtype(dtype)
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(dtype or self.dtype).to(self.device)

    def randint(self, low: int, high: int, *shape, dtype=torch.long) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.gen).to(dtype).to(self.device)


# ---------------------------------------------------------------- references from the model's weights

def _columns(linear: nn.Module) -> torch.Tensor | None:
    """The output columns to check (None: all), so the reference weight stays small."""
    k, n = linear.in_features, linear.out_features
    if k * n <= FULL_CHECK_WEIGHTS:
        return None
    return torch.cat([torch.arange(EDGE_COLUMNS), torch.arange(n - EDGE_COLUMNS, n)])


def reference_weight(linear: nn.Module, ref: torch.dtype, cols: torch.Tensor | None = None):
    """(W [K, N'] as x @ W, bias [N'] or None) of a WQLinear or nn.Linear in `ref`, on columns `cols`."""
    if isinstance(linear, WQLinear):
        if cols is None:
            w = dequantize_gemm(linear.qweight, linear.qzeros, linear.scales.to(ref), linear.group_size)
        else:  # whole packed words (8 columns) around the wanted ones, then the wanted ones
            words = torch.unique(cols // 8).to(linear.qweight.device)
            wide = torch.cat([torch.arange(8) + 8 * int(i) for i in words.cpu()]).to(linear.qweight.device)
            w = dequantize_gemm(linear.qweight[:, words], linear.qzeros[:, words], linear.scales[:, wide].to(ref),
                                linear.group_size)
            w = w[:, torch.searchsorted(wide, cols.to(wide.device))]
    elif isinstance(linear, nn.Linear):
        w = linear.weight.to(ref).t() if cols is None else linear.weight[cols.to(linear.weight.device)].to(ref).t()
    else:
        raise TypeError(f"no reference for {type(linear).__name__}")
    b = linear.bias
    if b is not None:
        b = (b if cols is None else b[cols.to(b.device)]).to(ref)
    return w, b


def _apply(x: torch.Tensor, wb) -> torch.Tensor:
    w, b = wb
    y = x @ w
    return y + b if b is not None else y


# ---------------------------------------------------------------- the checks (each: reason or None)

def check_linear(fast: nn.Module, layer: nn.Module, rows: int, ins: Inputs,
                 compute_dtype: torch.dtype | None = None) -> str | None:
    """`fast` (built from `layer`) on `rows` random rows against `layer`'s exact weights."""
    cols = _columns(layer)
    x = ins.randn(rows, layer.in_features)
    want = _apply(x.to(ins.ref), reference_weight(layer, ins.ref, cols))
    got = fast(x)
    if cols is not None:
        got = got[:, cols.to(got.device)]
    return mismatch(got, want, tolerance(ins.dtype, compute_dtype or ins.dtype))


def check_mlp(fast: nn.Module, mlp: nn.Module, rows: int, ins: Inputs) -> str | None:
    """A fused MLP (epilogue in the int4 kernels) against the model's MLP computed from its weights."""
    x = ins.randn(rows, mlp.up_proj.in_features).to(ins.ref)
    up = _apply(x, reference_weight(mlp.up_proj, ins.ref))
    h = F.silu(_apply(x, reference_weight(mlp.gate_proj, ins.ref))) * up if mlp.gated else F.relu(up).square()
    want = _apply(h, reference_weight(mlp.down_proj, ins.ref))
    return mismatch(fast(x.to(ins.dtype)), want, tolerance(ins.dtype))


def reference_norm(norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    ref = h.dtype
    if isinstance(norm, LayerNorm1P):
        return F.layer_norm(h, (h.shape[-1],), norm.weight.to(ref) + 1.0, norm.bias.to(ref), norm.eps)
    if isinstance(norm, RMSNorm):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.to(ref)
    raise TypeError(f"no reference for {type(norm).__name__}")


def check_norm(norm: nn.Module, ins: Inputs) -> str | None:
    """The fused add + norm kernel, with and without a residual, against the model's norm."""
    # optional: needs triton (the gpu extra)
    from .triton.modules import norm_args
    from .triton.norms import add_norm

    d = norm.weight.shape[-1]
    x, r = ins.randn(3, d), ins.randn(3, d)
    y, _ = add_norm(x, None, *norm_args(norm))
    reason = mismatch(y, reference_norm(norm, x.to(ins.ref)), tolerance(ins.dtype))
    if reason:
        return f"without residual: {reason}"
    y, s = add_norm(x, r, *norm_args(norm))
    total = x + r  # the sum in the model's dtype, as the unfused model adds it
    reason = mismatch(s, total.to(ins.ref), tolerance(ins.dtype)) or mismatch(
        y, reference_norm(norm, total.to(ins.ref)), tolerance(ins.dtype))
    return f"with residual: {reason}" if reason else None


def _cache(ins: Inputs, kv_heads: int, positions: int, head_dim: int, quantized: bool):
    shape = (kv_heads, positions, head_dim)
    if not quantized:
        return torch.zeros(shape, dtype=ins.dtype, device=ins.device), None
    return torch.zeros(shape, dtype=torch.int8, device=ins.device), torch.ones(shape[:2], device=ins.device)


def _cached(values: torch.Tensor, scales: torch.Tensor | None, ref: torch.dtype) -> torch.Tensor:
    return values.to(ref) if scales is None else values.to(ref) * scales.to(ref)[..., None]


def check_rotary_kv(llm, quantized: bool, ins: Inputs) -> str | None:
    """Rotary + KV-cache write of one token at position 5 against apply_rotary and a plain write."""
    # optional: needs triton (the gpu extra)
    from .triton.rotary_kv import rotary_kv_write

    cfg, positions, pos = llm.cfg, 16, 5
    h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cos, sin = llm.rope(positions, ins.device)
    q, k, v = ins.randn(1, h * d), ins.randn(1, hkv * d), ins.randn(1, hkv * d)
    (kc, ks), (vc, vs) = _cache(ins, hkv, positions, d, quantized), _cache(ins, hkv, positions, d, quantized)
    q_out = rotary_kv_write(q, k, v, cos, sin, torch.tensor([pos], dtype=torch.int32, device=ins.device), kc, vc,
                            h, hkv, ks, vs)
    c, s = (t[pos:pos + 1].to(ins.dtype).to(ins.ref) for t in (cos, sin))  # rounded as the kernel reads them
    want_q = apply_rotary(q.to(ins.ref).view(1, 1, h, d).transpose(1, 2), c, s)[0]
    want_k = apply_rotary(k.to(ins.ref).view(1, 1, hkv, d).transpose(1, 2), c, s)[0]
    want_v = v.to(ins.ref).view(1, hkv, d).transpose(0, 1)
    slot_tol = tolerance(ins.dtype) + (2.0**-6 if quantized else 0.0)  # int8: half a step of max|x| / 127
    reason = (mismatch(q_out, want_q, tolerance(ins.dtype))
              or mismatch(_cached(kc, ks, ins.ref)[:, pos:pos + 1], want_k, slot_tol)
              or mismatch(_cached(vc, vs, ins.ref)[:, pos:pos + 1], want_v, slot_tol))
    if reason:
        return reason
    others = torch.ones(positions, dtype=torch.bool, device=ins.device)
    others[pos] = False
    if bool(kc[:, others].any()) or bool(vc[:, others].any()):
        return "wrote outside its cache slot"
    return None


def check_decode_attention(llm, quantized: bool, ins: Inputs) -> str | None:
    """Attention of one token over 37 of 48 cached positions against scaled_dot_product_attention."""
    # optional: needs triton (the gpu extra)
    from .triton.decode_attention import decode_attention

    cfg, positions, length = llm.cfg, 48, 37
    h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = ins.randn(h, d)
    if quantized:
        kc, vc = (ins.randint(-127, 128, hkv, positions, d, dtype=torch.int8) for _ in range(2))
        ks, vs = ((torch.rand(hkv, positions, generator=ins.gen) * 0.02 + 0.001).to(ins.device) for _ in range(2))
    else:
        kc, vc = ins.randn(hkv, positions, d), ins.randn(hkv, positions, d)
        ks = vs = None
    out = decode_attention(q, kc, vc, torch.tensor([length], dtype=torch.int32, device=ins.device),
                           k_scale=ks, v_scale=vs)
    kd, vd = _cached(kc, ks, ins.ref)[:, :length], _cached(vc, vs, ins.ref)[:, :length]
    want = F.scaled_dot_product_attention(q.to(ins.ref)[None, :, None], kd[None], vd[None],
                                          enable_gqa=h != hkv)[0, :, 0]
    return mismatch(out, want, tolerance(ins.dtype))


def check_fused_step(llm, quantized: bool, ins: Inputs) -> str | None:
    """One fused decode step (what the CUDA graph replays) after a 3-token prefill, against one
    step of the model's own forward from a copy of the same cache: logits, and every cache slot
    (the new one written right, the others untouched). The modules both share (linears, MLPs)
    were checked on their own before; this checks the fused step's own parts (add + norm,
    rotary + KV write, attention) working together at a real position."""
    # optional: needs triton (the gpu extra)
    from .triton.fused_decode import FusedDecoder

    prompt = 3
    ids = ins.randint(0, llm.cfg.vocab_size, 1, prompt + 1)
    ref_cache = llm.new_cache(prompt + 4, quantized=quantized)
    llm(llm.embed(ids[:, :prompt]), ref_cache)
    fused_cache = copy.deepcopy(ref_cache)
    want = llm(llm.embed(ids[:, prompt:]), ref_cache)[0, -1]
    decoder = FusedDecoder(llm, fused_cache)
    decoder.token.fill_(int(ids[0, prompt]))
    decoder.pos.fill_(prompt)
    got = decoder.forward()[0]
    fused_cache.advance(1)
    tol = tolerance(ins.dtype, roundoffs=128)
    reason = mismatch(got, want.to(ins.ref), tol)
    if reason:
        return f"logits: {reason}"
    for name in ("k", "v"):
        got, want = (_cached(getattr(c, name), getattr(c, f"{name}_scale"), ins.ref) for c in (fused_cache, ref_cache))
        if (reason := mismatch(got, want, tol)) is not None:
            return f"{name} cache: {reason}"
    return None


def check_graph_replay(llm, quantized: bool, ins: Inputs) -> str | None:
    """The CUDA-graph engine over `llm` as converted (the fused step recorded once, then replayed)
    against the plain engine over the same model: logits of two steps after a 3-token prefill;
    the second replay reads its token and position from the device, as every later token does.
    A recording that fails (the engine would then decode without graphs) fails the check."""
    # optional: needs triton (the gpu extra)
    from .triton.cuda_graph import CUDAGraphEngine

    prompt, steps = 3, 2
    ids = ins.randint(0, llm.cfg.vocab_size, 1, prompt + steps)
    size = prompt + steps + 3
    plain, graph = TorchEngine(llm, size, quantized), CUDAGraphEngine(llm, size, kv_cache_int8=quantized)
    embeds = llm.embed(ids[:, :prompt])
    plain.prefill(embeds)
    graph.prefill(embeds)
    tol = tolerance(ins.dtype, roundoffs=128)
    for i in range(prompt, prompt + steps):
        want = plain.step(int(ids[0, i]))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = graph.step(int(ids[0, i]))
        if graph.replay is False:
            return "recording failed: " + (str(caught[0].message) if caught else "no replay")
        if (reason := mismatch(got, want.to(ins.ref), tol)) is not None:
            return f"step {i - prompt + 1}: {reason}"
    return None
