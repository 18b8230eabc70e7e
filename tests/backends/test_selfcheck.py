"""The CUDA path's self-check and fallbacks, run on CPU: Triton kernels through the interpreter,
torch's int4 matmul through its CPU twin, faults injected into the real kernels.

Each fault (a kernel Triton refuses to compile, one that returns wrong values, one that returns
NaN, a CUDA-graph capture that fails, a wrong fused step) is injected where the model itself
calls the kernel, so an undetected fault would reach the answer. Each must give the reference
model's greedy tokens exactly and exactly one warning naming the op.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")  # the kernels need it (the `gpu`/`test` extras)
import triton.language as tl  # noqa: E402

from edge_vlm.backends import SelfCheckWarning, make_engine, optimize_for_device  # noqa: E402
from edge_vlm.backends import selfcheck  # noqa: E402
from edge_vlm.backends.cuda_int4 import int4_linear  # noqa: E402
from edge_vlm.backends.triton import cuda_graph, decode_attention, norms, rotary_kv, w4a16  # noqa: E402
from edge_vlm.backends.triton.cuda_graph import CUDAGraphEngine  # noqa: E402
from edge_vlm.backends.triton.fused_decode import FusedDecoder  # noqa: E402
from edge_vlm.backends.triton.launcher import kernel  # noqa: E402
from edge_vlm.backends.torch_engine import TorchEngine
from tests.kernel_helpers import SpecWQLinear, quantize_layers, random_int4  # noqa: E402

PROMPT, NEW_TOKENS = 5, 3


def _model(tmp_path_factory, kind):
    from edge_vlm.loading import load_model
    from tests.factories import make_llm

    folder = tmp_path_factory.mktemp(f"selfcheck-{kind}")
    make_llm(folder, kind, seed=7, num_hidden_layers=1)  # one layer: the interpreter is slow
    llm = load_model(folder, device="cpu", progress=False, fast_path=False).llm
    quantize_layers(llm)
    return llm


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _model(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def nemotron(tmp_path_factory):
    return _model(tmp_path_factory, "nemotron")


def _ids(llm):
    return torch.randint(0, llm.cfg.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(3))


def greedy(llm, ids, engine=None, report=None) -> list[int]:
    """Greedy tokens after `ids` from the engine the runtime would build for `llm` (`report`: its self-check's)."""
    engine = engine or make_engine(llm, 16, report=report)
    with torch.inference_mode():
        logits = engine.prefill(llm.embed(ids))
        tokens = []
        for _ in range(NEW_TOKENS):
            tokens.append(int(logits.argmax()))
            logits = engine.step(tokens[-1])
    return tokens


@pytest.fixture(scope="module")
def reference_tokens(llama):
    return greedy(llama, _ids(llama), TorchEngine(llama, 16))  # the plain torch model, dequantize + matmul


def _optimize(llm, backend="triton", kv_cache_int8=False):
    """optimize_for_device on a copy of `llm`; returns (copy, its report, the warnings raised)."""
    fast = copy.deepcopy(llm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = optimize_for_device(fast, backend=backend, kv_cache_int8=kv_cache_int8).report
    return fast, report, caught


def _tokens_and_warnings(llm, report):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = greedy(llm, _ids(llm), report=report)
    return tokens, caught


# ---- faults, injected into the kernels the model itself calls -------------------------------

@kernel
def _rejected(x_ptr):
    tl.store(x_ptr + tl.arange(0, 3), 0.0)  # Triton rejects a range that is not a power of two


class Faulty:
    """A launcher.Kernel stand-in whose launches go wrong one way: "compile" (Triton refuses the
    kernel), "wrong" (the real result, shifted by 1% of its largest value), "nan". `out` is the
    index of the output argument; `when(kwargs)` limits the fault to some launches (e.g. one
    epilogue)."""

    def __init__(self, real, fault: str, out: int, when=None):
        self.real, self.fault, self.out, self.when = real, fault, out, when
        self.launches = 0

    def on(self, device):
        real = self.real.on(device)
        faulty = self

        class Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    if faulty.when is not None and not faulty.when(kwargs):
                        return real[grid](*args, **kwargs)
                    faulty.launches += 1
                    if faulty.fault == "compile":
                        return _rejected.on(device)[(1,)](torch.zeros(4, device=device))
                    real[grid](*args, **kwargs)
                    y = args[faulty.out]
                    if faulty.fault == "nan":
                        y.fill_(float("nan"))
                    else:
                        y.add_(0.01 * y.float().abs().max().to(y.dtype))
                return launch

        return Grid()


def _inject(monkeypatch, module, name, fault, out, when=None) -> Faulty:
    faulty = Faulty(getattr(module, name), fault, out, when)
    monkeypatch.setattr(module, name, faulty)
    return faulty


def _one_warning(caught, op, reason):
    texts = [str(w.message) for w in caught]
    assert len(caught) == 1, texts
    assert issubclass(caught[0].category, SelfCheckWarning)
    assert texts[0].startswith(f"edge-vlm self-check: {op} failed (") and reason in texts[0], texts


def test_all_kernels_pass_and_serve_the_whole_cuda_path(llama, reference_tokens):
    fast, report, caught = _optimize(llama)
    assert caught == []
    assert [c.op for c in report.checks] == ["w4a16_gemv", "w4a16_gemm", "epilogue", "fused_norm", "rotary_kv",
                                             "decode_attention", "fused_decode_step", "cuda_graph"]
    assert all(c.passed for c in report.checks) and report.checked and report.first_run is None  # in-process only
    assert (report.linear, report.fused_mlp, report.fused_norm, report.fused_decode) == ("triton", True, True, True)
    assert report.cuda_graph
    assert report.counts == {"fused_gated_mlp": 1, "w4a16_linear": 4, "fused_norm": 3}
    assert isinstance(make_engine(fast, 16, report=report), CUDAGraphEngine)
    tokens, caught = _tokens_and_warnings(fast, report)
    assert tokens == reference_tokens and caught == []


@pytest.mark.parametrize("module,name,fault,out,op,reason", [
    (w4a16, "_w4a16_gemv", "compile", 5, "w4a16_gemv", "arange"),
    (w4a16, "_w4a16_gemm", "wrong", 5, "w4a16_gemm", "mismatch"),
])
def test_a_failing_int4_kernel_falls_back_to_torchs_int4_matmul(llama, reference_tokens, monkeypatch, module, name,
                                                                fault, out, op, reason):
    faulty = _inject(monkeypatch, module, name, fault, out)
    fast, report, caught = _optimize(llama)
    _one_warning(caught, op, reason)
    assert faulty.launches == 1  # found on its first launch, never launched again
    assert report.linear == "torch_int4" and not report.fused_mlp  # the fused MLPs need the Triton layout
    assert report.counts["torch_int4_linear"] == 7 and "w4a16_linear" not in report.counts
    assert report.fused_decode  # the fused step runs over whatever linears passed
    tokens, caught = _tokens_and_warnings(fast, report)
    assert tokens == reference_tokens and caught == [] and faulty.launches == 1


def test_triton_and_torch_int4_both_failing_leave_the_reference_linears(llama, reference_tokens, monkeypatch):
    _inject(monkeypatch, w4a16, "_w4a16_gemv", "nan", 5)
    cpu = int4_linear.CPU_OPS
    wrong = int4_linear.Int4Ops(cpu.pack, lambda x, w, g, sz: cpu.mm(x, w, g, sz).roll(1, dims=-1), cpu.compute_dtype)
    monkeypatch.setattr(int4_linear, "CPU_OPS", wrong)  # a packing mistake: every column one place off
    fast, report, caught = _optimize(llama)
    texts = [str(w.message) for w in caught]
    assert len(texts) == 2 and "w4a16_gemv failed (NaN" in texts[0] and "torch_int4 failed (1 row(s): mismatch" in texts[1]
    assert report.linear == "reference" and "dequantize + matmul" in texts[1]
    assert not any("linear" in kind for kind in report.counts)  # the loaded WQLinears stay
    assert greedy(fast, _ids(fast), report=report) == reference_tokens


def test_a_failing_epilogue_unfuses_the_mlps_only(llama, reference_tokens, monkeypatch):
    _inject(monkeypatch, w4a16, "_w4a16_gemv", "nan", 5, when=lambda kw: kw["ACT"] == w4a16.ACT_SILU_MUL)
    fast, report, caught = _optimize(llama)
    _one_warning(caught, "epilogue", "NaN")
    assert report.linear == "triton" and not report.fused_mlp and report.fused_decode
    assert report.counts == {"w4a16_linear": 7, "fused_norm": 3}  # gate, up and down as plain W4A16 linears
    tokens, caught = _tokens_and_warnings(fast, report)
    assert tokens == reference_tokens and caught == []


def test_a_failing_relu2_epilogue_unfuses_nemotrons_mlps(nemotron, monkeypatch):
    want = greedy(nemotron, _ids(nemotron), TorchEngine(nemotron, 16))
    _inject(monkeypatch, w4a16, "_w4a16_gemm", "wrong", 5, when=lambda kw: kw["ACT"] == w4a16.ACT_RELU2)
    fast, report, caught = _optimize(nemotron)
    _one_warning(caught, "epilogue", "mismatch")
    assert report.linear == "triton" and not report.fused_mlp
    tokens, caught = _tokens_and_warnings(fast, report)
    assert tokens == want and caught == []


@pytest.mark.parametrize("module,name,fault,out,op,reason", [
    (norms, "_add_norm", "nan", 4, "fused_norm", "NaN"),
    (rotary_kv, "_rotary_kv", "wrong", 6, "rotary_kv", "mismatch"),
    (decode_attention, "_decode_attention", "compile", 8, "decode_attention", "arange"),
])
def test_a_failing_decode_kernel_turns_off_the_fused_step(llama, reference_tokens, monkeypatch, module, name, fault,
                                                          out, op, reason):
    _inject(monkeypatch, module, name, fault, out)
    fast, report, caught = _optimize(llama)
    _one_warning(caught, op, reason)
    assert report.linear == "triton" and not report.fused_decode
    assert report.fused_norm == (op != "fused_norm")
    assert "fused_decode_step" not in [c.op for c in report.checks]  # not tried on a part known broken
    assert type(make_engine(fast, 16, report=report)) is TorchEngine
    tokens, caught = _tokens_and_warnings(fast, report)
    assert tokens == reference_tokens and caught == []


def test_a_wrong_fused_step_turns_off_the_fused_decode(llama, reference_tokens, monkeypatch):
    """Every part right on its own, the whole step wrong (e.g. a position off by one): found by
    the whole-step check."""
    real = FusedDecoder.forward

    def off_by_one(self):
        self.pos.add_(1)
        try:
            return real(self)
        finally:
            self.pos.sub_(1)

    monkeypatch.setattr(FusedDecoder, "forward", off_by_one)
    fast, report, caught = _optimize(llama)
    _one_warning(caught, "fused_decode_step", "mismatch")
    assert report.fused_norm and not report.fused_decode and type(make_engine(fast, 16, report=report)) is TorchEngine
    tokens, caught = _tokens_and_warnings(fast, report)
    assert tokens == reference_tokens and caught == []


def _capture_fails(decoder):
    raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failing_capture_at_load_decodes_with_plain_steps(llama, reference_tokens, monkeypatch):
    """The recording is checked at load: one that fails turns off the graphs, not the model."""
    monkeypatch.setattr(cuda_graph, "recorder_for", lambda device: _capture_fails)
    fast, report, caught = _optimize(llama)
    _one_warning(caught, "cuda_graph", "recording failed: CUDA graph capture failed (RuntimeError")
    assert report.fused_decode and not report.cuda_graph and type(make_engine(fast, 16, report=report)) is TorchEngine
    tokens, caught = _tokens_and_warnings(fast, report)
    assert tokens == reference_tokens and caught == []


def test_a_capture_failing_after_load_decodes_with_plain_steps(llama, reference_tokens):
    """A recording that fails later (a shape the load's check did not see): the engine itself
    warns once and decodes with plain steps."""
    fast, report, caught = _optimize(llama)
    assert caught == [] and report.cuda_graph
    engine = CUDAGraphEngine(fast, 16, record=_capture_fails)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = greedy(fast, _ids(fast), engine)
    assert tokens == reference_tokens
    assert len(caught) == 1 and "CUDA graph capture failed (RuntimeError" in str(caught[0].message)


def test_cuda_without_triton_uses_torchs_int4_matmul(llama, reference_tokens):
    fast, report, caught = _optimize(llama, backend="cuda_int4")
    assert caught == [] and [c.op for c in report.checks] == ["torch_int4"]
    assert report.linear == "torch_int4" and report.counts == {"torch_int4_linear": 7} and not report.fused_decode
    assert type(make_engine(fast, 16, report=report)) is TorchEngine
    assert greedy(fast, _ids(fast), report=report) == reference_tokens


def test_unchecked_conversion_trusts_every_fast_path(llama):
    fast = copy.deepcopy(llama)
    report = optimize_for_device(fast, backend="triton", check=False).report
    assert report.checks == [] and not report.checked
    assert (report.linear, report.fused_mlp, report.fused_norm, report.fused_decode) == ("triton", True, True, True)


def test_the_report_is_plain_data(llama):
    fast = copy.deepcopy(llama)
    d = optimize_for_device(fast, backend="cuda_int4").report.to_dict()
    assert d["linear"] == "torch_int4" and d["checks"][0]["op"] == "torch_int4" and d["checks"][0]["passed"]
    import json

    json.dumps(d)


# ---- the checks themselves: sensitive to real mistakes, quiet on correct 16-bit kernels -------

def test_mismatch_names_shape_nan_and_error():
    want = torch.randn(4, 8, dtype=torch.float64)
    assert selfcheck.mismatch(want.float(), want, 1e-6) is None
    assert "shape" in selfcheck.mismatch(want[:, :4], want, 1e-6)
    assert selfcheck.mismatch(torch.full((4, 8), float("nan")), want, 1e-6) == "NaN or inf in the output"
    assert "relative error" in selfcheck.mismatch(want * 1.01, want, 1e-3)


def test_tolerances_are_a_few_roundoffs_of_the_coarsest_dtype():
    assert selfcheck.tolerance(torch.float16) == 16 * 2**-11 + 2**-16
    assert selfcheck.tolerance(torch.float16, torch.bfloat16) == 16 * 2**-8 + 2**-16
    assert selfcheck.tolerance(torch.bfloat16, roundoffs=128) == 0.125 + 2**-16  # capped


def _fp16_layer(k=256, n=96, group=64, seed=5):
    q, z, s = random_int4(k, n, group, seed=seed)
    return SpecWQLinear(q, z, s, group, torch.randn(n).half())


@pytest.mark.parametrize("rows", [selfcheck.DECODE_ROWS, selfcheck.PREFILL_ROWS])
def test_correct_fp16_kernels_pass_and_a_wrong_zero_point_fails(rows):
    """fp16, the GPU's dtype: the real GEMV/GEMM pass with room to spare; the same layer repacked
    with one zero point off by one in a single group (a packing mistake) fails."""
    from edge_vlm.backends.triton.modules import TritonW4Linear

    layer = _fp16_layer()
    ins = selfcheck.Inputs(torch.device("cpu"), torch.float16)
    fast = TritonW4Linear.from_awq(layer)
    assert selfcheck.check_linear(fast, layer, rows, ins) is None
    fast.wzeros[:, 1] += 1  # group 1 of 4: every output row's weights there shifted by one step
    assert "mismatch" in selfcheck.check_linear(fast, layer, rows, ins)


def test_torch_int4_check_catches_a_nibble_order_mistake():
    layer = _fp16_layer()
    ins = selfcheck.Inputs(torch.device("cpu"), torch.float16)
    fast = int4_linear.TorchInt4Linear(layer)
    assert selfcheck.check_linear(fast, layer, 1, ins, torch.float32) is None
    q = next(int4_linear.gemm_to_cpu_int4_weight(layer.qweight))[1]
    swapped = q.reshape(q.shape[0], -1, 2).flip(-1).reshape(q.shape)  # neighbours exchanged along K
    fast.int4_packed.copy_(int4_linear.CPU_OPS.pack(swapped.contiguous()))
    assert "mismatch" in selfcheck.check_linear(fast, layer, 1, ins, torch.float32)


def test_big_layers_are_checked_on_their_edge_columns(monkeypatch):
    """A layer too big to dequantize whole (a big-vocabulary lm_head) is compared on its first
    and last columns: a mistake in the last output block is still found."""
    from edge_vlm.backends.triton.modules import TritonW4Linear

    monkeypatch.setattr(selfcheck, "FULL_CHECK_WEIGHTS", 1000)
    monkeypatch.setattr(selfcheck, "EDGE_COLUMNS", 16)
    layer = _fp16_layer(k=64, n=96, group=32)
    cols = selfcheck._columns(layer)
    assert cols.tolist() == list(range(16)) + list(range(80, 96))
    w, b = selfcheck.reference_weight(layer, torch.float64, cols)
    full, full_b = selfcheck.reference_weight(layer, torch.float64)
    assert torch.equal(w, full[:, cols]) and torch.equal(b, full_b[cols])
    ins = selfcheck.Inputs(torch.device("cpu"), torch.float16)
    fast = TritonW4Linear.from_awq(layer)
    assert selfcheck.check_linear(fast, layer, 1, ins) is None
    fast.wscales[-8:] *= 2  # the last 8 output rows' scales doubled
    assert "mismatch" in selfcheck.check_linear(fast, layer, 1, ins)


def test_fp16_norm_rotary_and_attention_checks_pass_on_the_real_kernels(llama):
    half = copy.deepcopy(llama).half()
    ins = selfcheck.Inputs(torch.device("cpu"), torch.float16)
    assert selfcheck.check_norm(half.norm, ins) is None
    for int8 in (False, True):
        assert selfcheck.check_rotary_kv(half, int8, ins) is None
        assert selfcheck.check_decode_attention(half, int8, ins) is None


def test_int8_cache_model_checks_the_int8_kernels(llama, monkeypatch):
    """A model that decodes over an int8 KV cache is checked with the int8 variants; a cache kind
    changed after loading is checked when make_engine builds the engine for it."""
    fast, report, caught = _optimize(llama, kv_cache_int8=True)
    assert caught == [] and report.kv_cache_int8 and report.fused_decode
    assert isinstance(make_engine(fast, 16, kv_cache_int8=True, report=report), CUDAGraphEngine)
    # an engine over the fp32 cache, not the checked one; and now the fp32 cache's attention is broken
    _inject(monkeypatch, decode_attention, "_decode_attention", "nan", 8, when=lambda kw: not kw["QUANT"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = make_engine(fast, 16, report=report)
    _one_warning(caught, "decode_attention", "NaN")
    assert type(engine) is TorchEngine and not report.kv_cache_int8 and not report.fused_decode


# ---- torch's int4 path: its own format, tested against the spec ------------------------------

def test_pair_nibbles_puts_even_k_in_the_high_nibble():
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]])
    assert pair_bytes(q) == [[0x12, 0x34], [0xF0, 0x0F]]


def pair_bytes(q):
    return int4_linear.pair_nibbles(q).tolist()


@pytest.mark.parametrize("k,expected", [(4096, 8), (2560, 8), (96, 2), (192, 4)])
def test_inner_k_tiles_is_the_largest_that_divides_k(k, expected):
    assert int4_linear.inner_k_tiles(k) == expected


def test_torch_int4_takes_only_the_group_sizes_and_widths_its_kernel_has():
    fits = int4_linear.torch_int4_fits
    assert fits(SpecWQLinear(*random_int4(64, 16, 32, seed=1), 32))
    assert not fits(SpecWQLinear(*random_int4(64, 16, 16, seed=1), 16))  # group 16
    assert not fits(SpecWQLinear(*random_int4(48, 16, 48, seed=1), 48))  # K not a multiple of 32


def test_torch_int4_linear_matches_the_spec_with_bias_and_padding():
    q, z, s = random_int4(128, 40, 32, seed=2, scale_dtype=torch.float32)  # N = 40: padded to 48 inside
    ref = SpecWQLinear(q, z, s, 32, torch.randn(40))
    fast = int4_linear.TorchInt4Linear(ref)
    x = torch.randn(2, 3, 128)
    got, want = fast(x), ref(x)
    assert got.shape == want.shape == (2, 3, 40)
    # fp32 compute: (8 - z) s rounded once in fp32, plus fp32 accumulation over 128 terms
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
