"""Int4 repacking (GEMM -> Triton and CPU int4 formats) and the W4A16 GEMV/GEMM kernels vs plain torch.

Runs on CPU through Triton's interpreter (small shapes: the interpreter is slow) and on CUDA
when present. Inputs are fp16 (the runtime's GPU dtype; the interpreter handles fp16 via numpy).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # the kernels need it (the `gpu`/`test` extras)

from edge_vlm.backends.triton.w4a16 import ACT_RELU2, ACT_SILU_MUL, w4a16_matmul
from edge_vlm.formats.int4_formats import (AWQ_ORDER, NATURAL_ORDER, concat_outputs, gemm_to_triton, pack_nibbles, pack_triton,
                                   unpack_nibbles)
from tests.awq_reference import awq_pack
from tests.kernel_helpers import DEVICES, exact_dequant, random_int4


def test_unpack_awq_inverts_the_spec_packer():
    q = torch.randint(0, 16, (5, 24))
    assert torch.equal(unpack_nibbles(awq_pack(q), AWQ_ORDER), q.int())


def test_pack_awq_agrees_with_the_spec_packer():
    q = torch.randint(0, 16, (6, 32))
    assert torch.equal(pack_nibbles(q, AWQ_ORDER), awq_pack(q))


def test_awq_nibble_order_matches_the_spec():
    # column 8c+2 lives in bits 4..7 of the word: a single nonzero value shows where
    q = torch.zeros(1, 8, dtype=torch.long)
    q[0, 2] = 9
    assert awq_pack(q).item() == 9 << 4
    assert unpack_nibbles(torch.tensor([[9 << 4]], dtype=torch.int32), AWQ_ORDER)[0].tolist() == [0, 0, 9, 0, 0, 0, 0, 0]


def test_triton_rows_roundtrip_in_natural_order():
    q = torch.randint(0, 16, (3, 40))
    packed = pack_nibbles(q, NATURAL_ORDER)
    assert packed.shape == (3, 5) and packed.dtype == torch.int32
    assert torch.equal(unpack_nibbles(packed, NATURAL_ORDER), q.int())
    assert ((packed[0, 0].item() >> 4) & 0xF) == q[0, 1].item()  # nibble j holds k = 8w + j


@pytest.mark.parametrize("k,n,group", [(64, 16, 32), (256, 40, 128), (96, 8, 32)])
def test_gemm_to_triton_preserves_every_weight(k, n, group):
    q, z, s = random_int4(k, n, group, seed=k + n)
    w = gemm_to_triton(awq_pack(q), awq_pack(z), s, group)
    assert w.qweight.shape == (n, k // 8) and w.qweight.is_contiguous()
    assert w.scales.shape == (n, k // group) and w.zeros.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(w.qweight, NATURAL_ORDER).t(), q.int())
    assert torch.equal(w.zeros.t().long(), z) and torch.equal(w.scales.t(), s)
    assert torch.equal(w.qweight, pack_triton(q, z, s, group).qweight)  # from integers: the same layout


def test_repacks_in_column_chunks_equal_whole_repacks(monkeypatch):
    """Big layers are repacked a block of columns at a time (bounded memory): with tiny chunks
    (64 columns; 200 = 3 full chunks and a ragged one, padded to 16 for the CPU kernel) the
    results equal one-shot repacks."""
    from edge_vlm.formats import int4_formats
    from edge_vlm.backends.cpu.int4_linear import CpuInt4Linear, cpu_int4_available
    from tests.kernel_helpers import SpecWQLinear

    k, n, group = 128, 200, 32
    q, z, s = random_int4(k, n, group, seed=11, scale_dtype=torch.float32)
    whole = gemm_to_triton(awq_pack(q), awq_pack(z), s, group)
    layer = SpecWQLinear(q, z, s, group)
    whole_cpu = CpuInt4Linear(layer, torch.float32).int4_packed if cpu_int4_available() else None
    monkeypatch.setattr(int4_formats, "REPACK_CHUNK_WEIGHTS", 64 * k)
    assert int4_formats.column_chunks(k, n) == [(0, 64), (64, 128), (128, 192), (192, 200)]
    chunked = gemm_to_triton(awq_pack(q), awq_pack(z), s, group)
    assert torch.equal(chunked.qweight, whole.qweight)
    assert torch.equal(unpack_nibbles(chunked.qweight, NATURAL_ORDER).t(), q.int())
    if whole_cpu is not None:
        assert torch.equal(CpuInt4Linear(layer, torch.float32).int4_packed, whole_cpu)


def _tolerance(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-element bound: output rounding to fp16 (2^-11 relative, doubled) plus fp32 accumulation
    over K terms (K * 2^-24 of sum |x w|, doubled)."""
    k = x.shape[-1]
    return 2**-10 * ref.abs() + k * 2**-23 * (x.abs().double() @ w.abs()) + 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,k,n,group", [
    (1, 256, 96, 128),   # decode, one token
    (3, 192, 40, 64),    # ragged: K not a multiple of the 256-weight K step, N not of the 16-row block
    (8, 128, 72, 32),    # the largest GEMV row count
    (1, 1024, 24, 128),  # several K steps
])
def test_gemv_matches_torch(device, m, k, n, group):
    q, z, s = random_int4(k, n, group, seed=m * 1000 + n)
    w = gemm_to_triton(awq_pack(q).to(device), awq_pack(z).to(device), s.to(device), group)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).half().to(device)
    bias = torch.randn(n).half().to(device)
    wd = exact_dequant(q, z, s, group).to(device)
    ref = x.double() @ wd + bias.double()
    y = w4a16_matmul(x, w, bias)
    assert y.shape == (m, n) and y.dtype == torch.float16
    assert ((y.double() - ref).abs() <= _tolerance(x, wd, ref)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,k,n,group", [(9, 128, 48, 64), (37, 96, 40, 32)])
def test_gemm_matches_dequantize_then_matmul(device, m, k, n, group):
    q, z, s = random_int4(k, n, group, seed=m + k)
    w = pack_triton(q.to(device), z.to(device), s.to(device), group)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half().to(device)
    # the prefill GEMM rounds dequantized weights to fp16 like dequantize-then-matmul does
    wd = exact_dequant(q, z, s, group).half().double().to(device)
    ref = x.double() @ wd
    y = w4a16_matmul(x.reshape(1, m, k), w)
    assert y.shape == (1, m, n)
    assert ((y[0].double() - ref).abs() <= _tolerance(x, wd, ref)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 12])  # GEMV epilogue, and GEMM + elementwise epilogue
def test_relu_squared_and_silu_mul_epilogues(device, m):
    k, n, group = 128, 40, 64
    qg, zg, sg = random_int4(k, n, group, seed=1)
    qu, zu, su = random_int4(k, n, group, seed=2)
    gate = pack_triton(qg.to(device), zg.to(device), sg.to(device), group)
    up = pack_triton(qu.to(device), zu.to(device), su.to(device), group)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).half()
    wg, wu = exact_dequant(qg, zg, sg, group), exact_dequant(qu, zu, su, group)
    if m > 8:  # the GEMM path rounds weights to fp16 first
        wg, wu = wg.half().double(), wu.half().double()
    g, u = x.double() @ wg, x.double() @ wu
    tg, tu = _tolerance(x, wg, g), _tolerance(x, wu, u)
    x = x.to(device)

    relu2 = w4a16_matmul(x, gate, act=ACT_RELU2).double().cpu()
    ref = g.clamp_min(0) ** 2
    # d(y^2) = 2|y| dy, plus the final fp16 rounding
    assert ((relu2 - ref).abs() <= 2 * g.abs() * tg + tg**2 + 2**-10 * ref).all()

    both = concat_outputs([gate, up])
    out = w4a16_matmul(x, both, act=ACT_SILU_MUL).double().cpu()
    silu = g * torch.sigmoid(g)
    ref = silu * u
    # |silu'| <= 1.1: d(out) <= 1.1 dg |u| + |silu(g)| du, plus fp16 roundings of the result
    # (and of the intermediate gate/up outputs on the GEMM path)
    bound = 1.1 * tg * u.abs() + silu.abs() * tu + 2**-9 * ref.abs() + 2**-10 * (silu.abs() * u.abs()) + 1e-5
    assert (out.shape == (m, n)) and ((out - ref).abs() <= bound).all()


def test_gemv_rejects_a_mismatched_input():
    q, z, s = random_int4(64, 16, 32, seed=0)
    with pytest.raises(ValueError, match="features"):
        w4a16_matmul(torch.randn(1, 32).half(), pack_triton(q, z, s, 32))


# ---- CPU: torch's int4 CPU matmul, as the runtime attaches it to AWQ linears -------------------

needs_cpu_int4 = pytest.mark.skipif(
    not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="this torch has no int4 CPU matmul")


@needs_cpu_int4
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,k,n,group", [(1, 256, 48, 64), (3, 160, 40, 32), (9, 384, 24, 128)])
def test_cpu_int4_matches_the_spec_dequantization(compute, rows, k, n, group):
    from edge_vlm.backends.cpu.int4_linear import CpuInt4Linear
    from tests.kernel_helpers import SpecWQLinear

    q, z, s = random_int4(k, n, group, seed=rows + k, scale_dtype=torch.float32)
    ref_layer = SpecWQLinear(q, z, s, group, torch.randn(n))
    fast = CpuInt4Linear(ref_layer, compute)
    x = torch.randn(2, rows, k, generator=torch.Generator().manual_seed(k))
    with torch.inference_mode():
        want, got = ref_layer(x), fast(x)
    assert got.dtype == x.dtype and got.shape == want.shape
    w = exact_dequant(q, z, s, group).float()
    offsets = (8 - z.double()).abs()[torch.arange(k) // group] * s.double()[torch.arange(k) // group]
    # |x| (|w| + |(8 - z) s|): what the roundings of x, s and (8 - z) s are relative to
    magnitude = (x.abs().double() @ (w.abs().double() + offsets)).float()
    if compute == torch.bfloat16:
        # x, s and (8 - z) s each rounded to bf16 (2^-9 relative), the result rounded to bf16 once
        bound = 1.1 * 2**-9 * magnitude + 2**-9 * want.abs() + 1e-6
    else:
        # fp32: (8 - z) s rounded once, plus fp32 accumulation over k terms
        bound = (2**-23 + k * 2**-24) * magnitude + 1e-6
    assert ((got - want).abs() <= bound).all()


@needs_cpu_int4
def test_cpu_int4_routes_by_rows_in_fp32_and_takes_every_size_in_bf16():
    from edge_vlm.backends.cpu.int4_linear import CPU_INT4_MAX_ROWS_FP32, CpuInt4Linear
    from tests.kernel_helpers import SpecWQLinear

    q, z, s = random_int4(128, 32, 64, seed=3, scale_dtype=torch.float32)
    ref_layer = SpecWQLinear(q, z, s, 64)
    fp32, bf16 = CpuInt4Linear(ref_layer, torch.float32), CpuInt4Linear(ref_layer, torch.bfloat16)
    big = torch.randn(CPU_INT4_MAX_ROWS_FP32 + 1, 128)
    with torch.inference_mode():
        assert torch.equal(fp32(big), ref_layer(big))  # prefill-sized: the AWQ layer's own forward, bit for bit
        assert not torch.equal(bf16(big), ref_layer(big))  # the int4 kernel, in bf16
        assert (bf16(big) - ref_layer(big)).abs().max() <= 2**-6 * ref_layer(big).abs().max()
    # bf16 needs no fallback, so the AWQ buffers are not kept: the packed copy is the only weight
    assert bf16.reference is None and fp32.reference is ref_layer
    assert sum(b.nbytes for b in bf16.buffers()) < 1.2 * sum(b.nbytes for b in ref_layer.buffers())


@needs_cpu_int4
def test_cpu_int4_takes_every_awq_width_and_skips_group_sizes_the_kernel_lacks():
    from edge_vlm.backends import optimize_for_device
    from edge_vlm.backends.cpu.int4_linear import CpuInt4Linear
    from tests.kernel_helpers import SpecWQLinear

    shapes = (("fits", 32, 64), ("n_not_multiple_of_16", 24, 64), ("small_group", 32, 16))
    model = torch.nn.ModuleDict({name: SpecWQLinear(*random_int4(128, n, group, seed=n, scale_dtype=torch.float32),
                                                        group) for name, n, group in shapes})
    reference = {name: model[name] for name, _, _ in shapes}
    model.norm = torch.nn.LayerNorm(4)  # gives the dispatcher a float parameter to read the device from
    assert optimize_for_device(model).counts == {"cpu_int4_linear": 2}
    assert [name for name, m in model.items() if isinstance(m, CpuInt4Linear)] == ["fits", "n_not_multiple_of_16"]
    assert model["small_group"] is reference["small_group"]  # untouched: still the plain path
    assert optimize_for_device(model).counts == {}  # already done: a second call swaps nothing
    x = torch.randn(3, 128)
    with torch.inference_mode():
        got, want = model["n_not_multiple_of_16"](x), reference["n_not_multiple_of_16"](x)
    assert got.shape == (3, 24)  # padded to 32 inside, cut back
    assert (got - want).abs().max() <= 2**-6 * want.abs().max()


@needs_cpu_int4
@pytest.mark.parametrize("value,bf16", [("1", True), ("0", False), ("off", False)])
def test_cpu_bf16_choices_can_be_forced_from_the_environment(monkeypatch, value, bf16):
    from edge_vlm.backends.cpu import timing

    def clear():
        timing.cpu_int4_compute_dtype.cache_clear()
        timing.cpu_bf16_matmul_is_faster.cache_clear()

    clear()
    monkeypatch.setenv("EDGE_VLM_CPU_BF16", value)
    try:
        assert timing.cpu_int4_compute_dtype() == (torch.bfloat16 if bf16 else torch.float32)
        assert timing.cpu_bf16_matmul_is_faster() is bf16
    finally:
        clear()  # the next caller measures again, without the override


@needs_cpu_int4
def test_cpu_int4_compute_dtype_is_measured_once():
    from edge_vlm.backends.cpu.timing import cpu_int4_compute_dtype

    first = cpu_int4_compute_dtype()
    assert first in (torch.float32, torch.bfloat16)
    assert cpu_int4_compute_dtype() is first  # cached: the timing runs once per process


def test_module_swaps_free_each_old_layer_before_making_the_next():
    """Converting a model must not hold all its old weights at once (peak VRAM at load)."""
    import weakref

    from edge_vlm.backends.swap import swap_modules
    from tests.kernel_helpers import SpecWQLinear

    model = torch.nn.Sequential(*[SpecWQLinear(*random_int4(64, 16, 32, seed=i), 32) for i in range(4)])
    old = [weakref.ref(m) for m in model]
    alive_when_making = []

    def make(module):
        alive_when_making.append(sum(ref() is not None for ref in old))
        return torch.nn.Identity()

    assert swap_modules(model, lambda m: isinstance(m, SpecWQLinear), make, "swapped") == {"swapped": 4}
    assert alive_when_making == [4, 3, 2, 1]  # the one being converted and those not yet reached
