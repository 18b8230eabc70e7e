"""Fused norm, rotary + KV write, decode attention, epilogue kernels, the static decode step,
and `optimize_for_device`, each against the plain torch path of the runtime.

CPU: Triton's interpreter (backends/triton/launcher.py wraps each kernel per device, so
TRITON_INTERPRET is never set and nothing leaks into the rest of the suite; a test below checks
that). CUDA when present.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")  # the kernels need it (the `gpu`/`test` extras)

from edge_vlm.backends.triton.activations import silu_mul
from edge_vlm.backends.triton.decode_attention import decode_attention
from edge_vlm.backends.triton.norms import LAYERNORM1P, RMS, add_norm
from edge_vlm.backends.triton.rotary_kv import rotary_kv_write
from edge_vlm.models.llm import LayerNorm1P, RMSNorm
from edge_vlm.models.rotary import apply_rotary
from tests.kernel_helpers import DEVICES, fused_step, quantize_layers



def _rand(*shape, seed, device, dtype=torch.float16):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", [RMS, LAYERNORM1P])
@pytest.mark.parametrize("rows,dim", [(1, 64), (3, 100)])  # 100: not a power of two (masked lanes)
def test_add_norm_matches_the_model_norms(device, kind, rows, dim):
    x, r = _rand(rows, dim, seed=1, device=device), _rand(rows, dim, seed=2, device=device)
    ref_norm = RMSNorm(dim, 1e-5) if kind == RMS else LayerNorm1P(dim, 1e-5)
    gen = torch.Generator().manual_seed(3)  # not the global RNG: the same weights whatever ran before
    with torch.no_grad():
        ref_norm.weight.copy_(torch.randn(dim, generator=gen) * 0.3)
        if kind == LAYERNORM1P:
            ref_norm.bias.copy_(torch.randn(dim, generator=gen) * 0.3)
    ref_norm = ref_norm.half().to(device)
    y, s = add_norm(x, r, ref_norm.weight, getattr(ref_norm, "bias", None), 1e-5, kind)
    assert torch.equal(s, x + r)  # the residual sum is the fp16 sum, bit for bit
    h = (x + r).float()
    # reference in fp32 on the same fp16 values (CPU has no fp16 layer_norm everywhere)
    ref = ref_norm.float()(h)
    # up to two fp16 roundings (normalised value, scaled output): 2 * 2^-11 relative, doubled
    assert ((y.float() - ref).abs() <= 2**-9 * ref.abs() + 2**-12).all()
    y0, same = add_norm(x, None, ref_norm.weight, getattr(ref_norm, "bias", None), 1e-5, kind)
    assert same is x and ((y0.float() - ref_norm.float()(x.float())).abs() <= 2**-9 * y0.float().abs() + 2**-12).all()


def _rotary_inputs(tokens, heads, kv_heads, head_dim, rotary_dim, s_max, seed, device):
    """q, k, v rows of one step's projections (fp16) and fp32 rope tables of s_max positions."""
    q = _rand(tokens, heads * head_dim, seed=seed, device=device)
    k = _rand(tokens, kv_heads * head_dim, seed=seed + 1, device=device)
    v = _rand(tokens, kv_heads * head_dim, seed=seed + 2, device=device)
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = torch.cat([torch.outer(torch.arange(s_max).float(), inv)] * 2, -1)
    return q, k, v, freqs.cos().to(device), freqs.sin().to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim,tokens,start", [
    (4, 2, 16, 16, 1, 9),   # decode, full rotary, GQA
    (4, 4, 16, 8, 3, 0),    # prefill-like, partial rotary (Nemotron)
    (6, 2, 24, 24, 2, 5),   # head_dim not a power of two
])
def test_rotary_with_kv_write_matches_apply_rotary(device, heads, kv_heads, head_dim, rotary_dim, tokens, start):
    s_max = 32
    q, k, v, cos, sin = _rotary_inputs(tokens, heads, kv_heads, head_dim, rotary_dim, s_max, 1, device)
    kc, vc = _rand(kv_heads, s_max, head_dim, seed=4, device=device), _rand(kv_heads, s_max, head_dim, seed=5,
                                                                            device=device)
    kc0, vc0 = kc.clone(), vc.clone()
    q_out = rotary_kv_write(q, k, v, cos, sin, torch.tensor([start], dtype=torch.int32, device=device), kc, vc,
                            heads, kv_heads)
    sl = slice(start, start + tokens)
    ref_q = apply_rotary(q.view(1, tokens, heads, head_dim).transpose(1, 2), cos[sl], sin[sl])[0]
    ref_k = apply_rotary(k.view(1, tokens, kv_heads, head_dim).transpose(1, 2), cos[sl], sin[sl])[0]
    # apply_rotary rounds 3 times in fp16 (two products, the sum), the kernel once: 4 * 2^-11 of the
    # magnitude of the two inputs of each output element, bounded by 2 max|x|
    assert (q_out - ref_q).abs().max() <= 2**-9 * 2 * q.abs().max()
    assert (kc[:, sl] - ref_k).abs().max() <= 2**-9 * 2 * k.abs().max()
    assert torch.equal(vc[:, sl], v.view(tokens, kv_heads, head_dim).transpose(0, 1))
    outside = torch.ones(s_max, dtype=torch.bool)
    outside[sl] = False
    assert torch.equal(kc[:, outside], kc0[:, outside]) and torch.equal(vc[:, outside], vc0[:, outside])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,length,splits,block", [
    (4, 2, 16, 27, 4, 4),   # ragged length vs block, GQA
    (2, 2, 24, 5, 8, 4),    # more splits than blocks (empty splits), head_dim not a power of two
    (4, 1, 16, 64, 2, 16),  # multi-query, whole cache
])
def test_decode_attention_matches_sdpa(device, heads, kv_heads, head_dim, length, splits, block):
    s_max = 64
    q = _rand(heads, head_dim, seed=1, device=device)
    kc, vc = _rand(kv_heads, s_max, head_dim, seed=2, device=device), _rand(kv_heads, s_max, head_dim, seed=3,
                                                                            device=device)
    out = decode_attention(q, kc, vc, torch.tensor([length], dtype=torch.int32, device=device), splits, block)
    ref = F.scaled_dot_product_attention(q.double()[None, :, None], kc[:, :length].double()[None],
                                         vc[:, :length].double()[None], enable_gqa=True)[0, :, 0]
    # a convex combination of v: the fp16 output rounding is <= 2^-11 max|v|; fp32 softmax adds ~1e-6
    assert (out.double() - ref).abs().max() <= 2**-10 * vc.abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim,tokens,start", [
    (4, 2, 16, 16, 1, 9),   # decode, full rotary, GQA
    (4, 4, 24, 12, 2, 3),   # partial rotary (Nemotron), head_dim not a power of two
])
def test_rotary_with_int8_kv_write_quantizes_like_the_cache(device, heads, kv_heads, head_dim, rotary_dim, tokens,
                                                           start):
    """The int8 write stores what int8_rows.quantize_int8_rows makes of the reference's rotated
    fp16 key and of the value: the same int8 codes (one step apart at most, where the kernel's
    fp32 rotation rounds to a different fp16 neighbour than apply_rotary) and the same scales."""
    from edge_vlm.formats.int8_rows import quantize_int8_rows

    s_max = 16
    q, k, v, cos, sin = _rotary_inputs(tokens, heads, kv_heads, head_dim, rotary_dim, s_max, 11, device)
    kc = torch.zeros(kv_heads, s_max, head_dim, dtype=torch.int8, device=device)
    vc = torch.zeros_like(kc)
    ks, vs = torch.ones(kv_heads, s_max, device=device), torch.ones(kv_heads, s_max, device=device)
    rotary_kv_write(q, k, v, cos, sin, torch.tensor([start], dtype=torch.int32, device=device), kc, vc, heads,
                    kv_heads, ks, vs)
    sl = slice(start, start + tokens)
    ref_k = apply_rotary(k.view(1, tokens, kv_heads, head_dim).transpose(1, 2), cos[sl], sin[sl])[0]
    want_k, want_ks = quantize_int8_rows(ref_k)
    want_v, want_vs = quantize_int8_rows(v.view(tokens, kv_heads, head_dim).transpose(0, 1))
    assert torch.equal(vc[:, sl], want_v) and torch.allclose(vs[:, sl], want_vs, rtol=1e-6)
    assert (kc[:, sl].int() - want_k.int()).abs().max() <= 1
    assert torch.allclose(ks[:, sl], want_ks, rtol=2**-10)  # max|k| itself may round to the other fp16 neighbour
    assert kc[:, sl].abs().max() == 127 and (ks[:, :start] == 1).all()  # full range used; other slots untouched


@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_over_an_int8_cache_matches_sdpa_on_its_values(device):
    """With an int8 cache the kernel scales each cached vector in registers: the result is
    attention over exactly the dequantized cache."""
    from edge_vlm.formats.int8_rows import dequantize_int8_rows

    heads, kv_heads, head_dim, s_max, length = 4, 2, 16, 40, 29
    gen = torch.Generator().manual_seed(21)
    kc = torch.randint(-127, 128, (kv_heads, s_max, head_dim), generator=gen, dtype=torch.int8).to(device)
    vc = torch.randint(-127, 128, (kv_heads, s_max, head_dim), generator=gen, dtype=torch.int8).to(device)
    ks = (torch.rand(kv_heads, s_max, generator=gen) * 0.02 + 0.001).to(device)
    vs = (torch.rand(kv_heads, s_max, generator=gen) * 0.02 + 0.001).to(device)
    q = _rand(heads, head_dim, seed=22, device=device)
    out = decode_attention(q, kc, vc, torch.tensor([length], dtype=torch.int32, device=device), 4, 8,
                           k_scale=ks, v_scale=vs)
    kd = dequantize_int8_rows(kc[:, :length], ks[:, :length], torch.float64)
    vd = dequantize_int8_rows(vc[:, :length], vs[:, :length], torch.float64)
    ref = F.scaled_dot_product_attention(q.double()[None, :, None], kd[None], vd[None], enable_gqa=True)[0, :, 0]
    # as for the fp16 cache: the fp16 output rounding, <= 2^-11 max|v|, plus fp32 softmax noise
    assert (out.double() - ref).abs().max() <= 2**-10 * vd.abs().max()


@pytest.mark.parametrize("device", DEVICES)
def test_silu_mul_epilogue(device):
    both = _rand(3, 2 * 1500, seed=7, device=device)  # > one 1024-element block, ragged
    gate, up = both[:, :1500], both[:, 1500:]  # strided views, as the prefill path passes them
    out = silu_mul(gate, up)
    ref = F.silu(gate.double()) * up.double()
    assert ((out.double() - ref).abs() <= 2**-10 * ref.abs() + 1e-6).all()  # one fp16 rounding (doubled)


# ---- the static decode step and the module swaps, on tiny real-architecture models -----------

def _tiny(kind, tmp_path_factory):
    from edge_vlm.loading import load_model
    from tests.factories import make_llm

    folder = tmp_path_factory.mktemp(f"kern-{kind}")
    make_llm(folder, kind, seed=3)
    return load_model(folder, device="cpu", progress=False)


@pytest.fixture(scope="module", params=["llama", "nemotron"])
def tiny_model(request, tmp_path_factory):
    return _tiny(request.param, tmp_path_factory)


def _prefill_then_step(llm, ids, step):
    """Logits of the last token after prefilling the rest, with `step(cache, token, pos)` for it."""
    cache = llm.new_cache(48)
    with torch.inference_mode():
        llm(llm.embed(ids[:, :-1]), cache)
        return step(cache, int(ids[0, -1]), ids.shape[1] - 1), cache


def test_fused_decode_step_matches_decoder_forward(tiny_model):
    from edge_vlm.backends.triton.fused_decode import FusedDecoder

    llm = tiny_model.llm
    ids = torch.randint(0, llm.cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    ref, ref_cache = _prefill_then_step(llm, ids, lambda c, t, p: llm(llm.embed(torch.tensor([[t]])), c)[0, -1])
    out, cache = _prefill_then_step(llm, ids, lambda c, t, p: fused_step(FusedDecoder(llm, c), t))
    # fp32 model: only fp32 reassociation differs (sums in other orders over 2 layers)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert cache.position == ref_cache.position == 9
    assert torch.allclose(cache.k[:, :, :, :9], ref_cache.k[:, :, :, :9], atol=1e-5)
    assert torch.allclose(cache.v[:, :, :, :9], ref_cache.v[:, :, :, :9], atol=1e-5)


def test_fused_decode_step_over_an_int8_cache_matches_decoder_forward(tiny_model):
    """What the CUDA graph replays, with an int8 KV cache: the step writes and reads the cache as
    the reference model does (int8_rows.quantize_int8_rows), so logits and cache agree."""
    from edge_vlm.backends.triton.fused_decode import FusedDecoder

    llm = tiny_model.llm
    ids = torch.randint(0, llm.cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(6))

    def run(step):
        cache = llm.new_cache(48, quantized=True)
        with torch.inference_mode():
            llm(llm.embed(ids[:, :-1]), cache)
            return step(cache, int(ids[0, -1]), 8), cache

    ref, ref_cache = run(lambda c, t, p: llm(llm.embed(torch.tensor([[t]])), c)[0, -1])
    out, cache = run(lambda c, t, p: fused_step(FusedDecoder(llm, c), t))
    # fp32 model: reassociated sums, plus the odd int8 code one step away where a rotated key
    # lands within rounding of a half step (each such flip moves that key by 1/254 of its max)
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert (cache.k[:, :, :, :9].int() - ref_cache.k[:, :, :, :9].int()).abs().max() <= 1
    assert torch.equal(cache.v[:, :, :, :9], ref_cache.v[:, :, :, :9])
    assert torch.allclose(cache.k_scale[:, :, :, :9], ref_cache.k_scale[:, :, :, :9], rtol=1e-5)


def test_optimize_for_device_triton_path_matches_reference(tmp_path_factory):
    """The CUDA path's module swaps (W4A16 linears, fused MLP epilogues, norms), run through the
    interpreter on a tiny int4 model: prefill (GEMM), decode (GEMV) and the fused static decode
    step all match the reference model's logits."""
    import copy

    from edge_vlm.backends import optimize_for_device
    from edge_vlm.backends.triton.fused_decode import FusedDecoder

    for kind in ("llama", "nemotron"):
        ref = _tiny(kind, tmp_path_factory).llm
        quantize_layers(ref)
        fast = copy.deepcopy(ref)
        counts = optimize_for_device(fast, backend="triton", check=False).counts  # tests/backends/test_selfcheck.py checks the checks
        mlp_kind = "fused_gated_mlp" if kind == "llama" else "fused_relu2_mlp"
        # per layer: q, k, v, o as W4A16 linears; the MLP (with its down_proj) as one fused module
        assert counts[mlp_kind] == 2 and counts["w4a16_linear"] == 2 * 4 and counts["fused_norm"] == 5
        ids = torch.randint(0, ref.cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            outs = []
            for model in (ref, fast):
                cache = model.new_cache(32)
                prefill = model(model.embed(ids), cache)[0, -1]
                step = model(model.embed(ids[:, :1]), cache)[0, -1]
                outs.append((prefill, step))
            # what the CUDA graph replays: the static decode step over the swapped int4 modules
            cache = fast.new_cache(32)
            fast(fast.embed(ids), cache)
            outs[1] += (fused_step(FusedDecoder(fast, cache), int(ids[0, 0])),)
            outs[0] += (outs[0][1],)
        for got, want in zip(outs[1], outs[0]):
            # fp32 throughout: reassociated sums only
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_triton_path_with_int4_lm_head_and_int8_embeddings():
    """The big-vocabulary settings (what `quantize --quantize-lm-head --quantize-embedding`
    writes) through the CUDA path's swaps and the static decode step, via the interpreter."""
    import copy

    from edge_vlm.benchmarks.random_model import build_llm
    from edge_vlm.benchmarks.shapes import llm_config
    from edge_vlm.backends import optimize_for_device
    from edge_vlm.backends.triton.fused_decode import FusedDecoder
    from edge_vlm.backends.triton.modules import TritonW4Linear

    ref = build_llm(llm_config("tiny"), "cpu", torch.float32, int4=True, int4_lm_head=True, int8_embedding=True)
    fast = copy.deepcopy(ref)
    optimize_for_device(fast, backend="triton", check=False)
    assert isinstance(fast.lm_head, TritonW4Linear)
    ids = torch.randint(0, ref.cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        cache_ref, cache_fast = ref.new_cache(16), fast.new_cache(16)
        want = (ref(ref.embed(ids), cache_ref)[0, -1], ref(ref.embed(ids[:, :1]), cache_ref)[0, -1])
        fast(fast.embed(ids), cache_fast)
        got = (fast(fast.embed(ids), fast.new_cache(16))[0, -1], fused_step(FusedDecoder(fast, cache_fast), int(ids[0, 0])))
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-4 * w.abs().max()  # fp32 throughout: reassociated sums only


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_optimize_for_device_on_cpu(tmp_path_factory, monkeypatch, compute):
    import copy

    from edge_vlm.backends import optimize_for_device
    from edge_vlm.backends.cpu import int4_linear
    from tests.kernel_helpers import SpecWQLinear

    if not int4_linear.cpu_int4_available():
        pytest.skip("this torch has no int4 CPU matmul")
    monkeypatch.setattr(int4_linear, "cpu_int4_compute_dtype", lambda: compute)  # both choices, whatever this CPU prefers
    model = _tiny("llama", tmp_path_factory)
    before = dict(model.llm.named_modules())
    assert optimize_for_device(model.llm, model.vision, model.projector).counts == {}  # unquantized on CPU: untouched
    assert dict(model.llm.named_modules()) == before

    ref = model.llm
    quantize_layers(ref)
    fast = copy.deepcopy(ref)
    counts = optimize_for_device(fast).counts
    assert counts == {"cpu_int4_linear": 2 * 7}
    down = fast.layers[0].mlp.down_proj
    assert isinstance(down, int4_linear.CpuInt4Linear)
    # fp32 keeps the AWQ layer for prefill; bf16 needs no fallback
    assert (type(down.reference) is SpecWQLinear) if compute == torch.float32 else down.reference is None
    assert optimize_for_device(fast).counts == {}  # idempotent: the kept AWQ layer is not swapped again
    ids = torch.randint(0, ref.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        outs = []
        for m in (ref, fast):
            cache = m.new_cache(16)
            prefill = m(m.embed(ids), cache)[0, -1]  # 6 rows: int4 in bf16; the reference path in fp32
            outs.append((prefill, m(m.embed(ids[:, :1]), cache)[0, -1]))  # 1 row: torch's int4 matmul
    for got, want in zip(outs[1], outs[0]):
        if compute == torch.float32:
            # the int4 kernel rounds (8 - z) * s once in fp32: ~1e-7 relative per weight
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()
        else:
            # 14 linears, each off by a few 2^-9 roundings (see test_cpu_int4_matches_the_spec_dequantization),
            # through norms that keep relative errors relative: a few percent of the largest logit at most
            assert (got - want).abs().max() <= 2**-5 * want.abs().max()
            assert not torch.equal(got, want)  # the bf16 kernel really ran


def test_optimize_for_device_skips_meta():
    from edge_vlm.formats.configs import LLMConfig
    from edge_vlm.backends import optimize_for_device
    from edge_vlm.models.llm import DecoderLM
    from tests.factories import llm_config

    with torch.device("meta"):
        llm = DecoderLM(LLMConfig.from_hf(llm_config("llama").to_dict()))
    assert optimize_for_device(llm).counts == {}


def test_interpreter_does_not_leak():
    """Interpreted launches neither set TRITON_INTERPRET, nor leave Triton's JIT patched, nor add
    names to the modules whose kernels the compiler will later read."""
    from triton.runtime.jit import JITFunction

    import edge_vlm.backends.triton.activations as kernels_module

    call = JITFunction.__call__
    tl = triton.language
    spaces = (kernels_module, tl, tl.core, tl.math, tl.standard, tl.tensor, tl.dtype)

    def snapshot():
        return [{k: id(v) for k, v in vars(space).items()} for space in spaces]

    before = snapshot()
    x = torch.randn(2, 10).half()
    silu_mul(x, x)  # no Triton helpers
    add_norm(torch.randn(2, 8).half(), None, torch.randn(8).half(), None, 1e-5)  # tl.sum: a jitted helper
    # nothing added to or replaced in the kernel module or triton.language
    assert snapshot() == before
    assert "TRITON_INTERPRET" not in os.environ
    assert not triton.knobs.runtime.interpret
    assert JITFunction.__call__ is call
    with pytest.raises(RuntimeError, match="outside of the scope of a kernel"):
        triton.language.zeros((2,), triton.language.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_engine_matches_eager_engine(tmp_path_factory):
    from edge_vlm.backends.triton.cuda_graph import CUDAGraphEngine
    from edge_vlm.backends.torch_engine import TorchEngine
    from edge_vlm.loading import load_model
    from tests.factories import make_llm

    folder = tmp_path_factory.mktemp("graph-llama")
    make_llm(folder, "llama", seed=4)
    llm = load_model(folder, device="cuda", progress=False).llm
    ids = torch.randint(0, llm.cfg.vocab_size, (1, 10), device="cuda")
    tokens = {}
    for cls in (TorchEngine, CUDAGraphEngine):
        eng = cls(llm, 64)
        logits = eng.prefill(llm.embed(ids))
        seq = []
        for _ in range(12):
            t = int(logits.argmax())
            seq.append(t)
            logits = eng.step(t)
        tokens[cls.__name__] = (seq, logits.float().cpu())
    assert tokens["TorchEngine"][0] == tokens["CUDAGraphEngine"][0]
    a, b = tokens["TorchEngine"][1], tokens["CUDAGraphEngine"][1]
    assert (a - b).abs().max() <= 2e-2 * a.abs().max()  # fp16 model: a few ulps through 2 layers


def test_make_engine_picks_the_plain_engine_without_a_checked_fused_step(tmp_path_factory):
    from edge_vlm.backends import make_engine
    from edge_vlm.backends.torch_engine import TorchEngine

    llm = _tiny("llama", tmp_path_factory).llm  # loaded on CPU: no CUDA self-check ran
    engine = make_engine(llm, 32)
    assert type(engine) is TorchEngine and engine.max_context == 32


def test_cuda_graph_engine_falls_back_to_plain_steps_when_capture_fails(tmp_path_factory):
    """If a GPU stack cannot capture the decode step, chat goes on (slower) with the plain step:
    same logits as the reference engine, one warning, and no second capture attempt. Runs on CPU
    with the recorder replaced by a failure (the rest of the engine is device-independent)."""
    from edge_vlm.backends.triton.cuda_graph import CUDAGraphEngine
    from edge_vlm.backends.torch_engine import TorchEngine

    attempts = []

    def capture_fails(decoder):
        attempts.append(1)
        decoder.forward()  # the warm-up writes the cache slot, as the real one does
        raise RuntimeError("operation not permitted when stream is capturing")

    llm = _tiny("llama", tmp_path_factory).llm
    ids = torch.randint(0, llm.cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))
    outs = []
    for engine in (TorchEngine(llm, 32), CUDAGraphEngine(llm, 32, record=capture_fails)):
        with torch.inference_mode():
            engine.prefill(llm.embed(ids))
        if isinstance(engine, CUDAGraphEngine):
            with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
                first = engine.step(3)
        else:
            first = engine.step(3)
        outs.append((first, engine.step(4), engine.cache.position))
    (want1, want2, want_len), (got1, got2, got_len) = outs
    assert torch.equal(got1, want1) and torch.equal(got2, want2) and got_len == want_len == 9
    assert len(attempts) == 1 and engine.replay is False


def test_fused_engine_on_cpu_steps_the_fused_decoder_eagerly(tmp_path_factory):
    """Off CUDA there is no graph to record: the engine replays the fused step itself (through
    the interpreter), which is how the self-check tests run the whole CUDA decode on CPU."""
    from edge_vlm.backends.triton.cuda_graph import CUDAGraphEngine, record_eager, recorder_for
    from edge_vlm.backends.torch_engine import TorchEngine

    llm = _tiny("llama", tmp_path_factory).llm
    assert recorder_for(torch.device("cpu")) is record_eager
    ids = torch.randint(0, llm.cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(8))
    outs = []
    for engine in (TorchEngine(llm, 16), CUDAGraphEngine(llm, 16)):
        with torch.inference_mode():
            engine.prefill(llm.embed(ids))
        outs.append(engine.step(7))
    assert (outs[1] - outs[0]).abs().max() <= 1e-4 * outs[0].abs().max()  # fp32: reassociated sums only
