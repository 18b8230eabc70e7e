"""The CUDA path, op kind by op kind: each fast op serves only after its self-check passed.

A user's first chat on an RTX laptop or a Jetson must answer correctly even if some kernel does
not compile on their Triton, launches wrongly or computes wrong numbers on their GPU. So before
the fast modules are swapped in, each kind of op the model will use is checked once
(backends/selfcheck.py), and a failure switches that kind to its next path with one warning
(`SelfCheckWarning`) naming the op and the reason:

- int4 linears: Triton W4A16 (`w4a16_gemv` for decode rows, `w4a16_gemm` for prefill, on one of
  the model's own layers per shape) -> torch's int4 matmul (`torch_int4`, checked the same way;
  sm80+) -> dequantize + matmul (the loaded `WQLinear`, the reference). GEMV and GEMM fall back
  together: both read one packed copy of each weight, and routing rows to two layouts would
  double the int4 memory. A CUDA machine without Triton starts this chain at `torch_int4`.
- `epilogue` (silu(gate) * up and relu^2 fused into the int4 kernels): -> the MLP in torch over
  the int4 linears.
- `fused_norm`: -> the model's norms in torch; the fused decode step needs it, so it goes too.
- `rotary_kv`, `decode_attention`: -> no fused decode step.
- `fused_decode_step` (the converted model's fused step vs its own plain step): -> the plain
  decode loop; `make_engine` then builds no CUDA graph.
- `cuda_graph` (the fused step recorded, then replayed, vs the plain engine): -> the fused step
  is not used; plain decode. (A recording that fails later, at a shape not checked, is handled
  by the engine itself: one warning, plain steps.)
The outcome is returned as a `SelfCheckReport` (the model keeps it: `make_engine` and `edge-vlm doctor` read it).

Who runs each check is a `Gate`'s call: by default every check runs here, in this process. The
first-run check (first_run.py) runs them all first in a child process, where a crash or a hang
costs nothing, through a gate that reports each one to the parent; the parent's gate then lets
only the ops the child passed run their check here again (the second guard: this model's own
layers) and turns the others off without touching them.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
import torch.nn as nn

from ..models.llm import DecoderLayer, LayerNorm1P, RMSNorm
from ..models.quant_linear import WQLinear
from . import selfcheck
from .cuda_int4 import convert as torch_int4_convert
from .cuda_int4.int4_linear import TorchInt4Linear, int4_ops, torch_int4_fits
from .selfcheck import Check, Inputs

LINEAR_PATHS = ("triton", "torch_int4", "reference")
OPS = ("w4a16_gemv", "w4a16_gemm", "torch_int4", "epilogue", "fused_norm", "rotary_kv", "decode_attention",
       "fused_decode_step", "cuda_graph")  # every op kind, in the order they are checked
FALLBACK_TEXT = {  # what runs instead when an op fails
    "w4a16_gemv": "int4 linears fall back to torch's int4 matmul",
    "w4a16_gemm": "int4 linears fall back to torch's int4 matmul",
    "torch_int4": "int4 linears fall back to dequantize + matmul (slow)",
    "epilogue": "MLPs run unfused in torch",
    "fused_norm": "norms run in torch; decoding without the fused step",
    "rotary_kv": "decoding without the fused step",
    "decode_attention": "decoding without the fused step",
    "fused_decode_step": "decoding without the fused step",
    "cuda_graph": "decoding without CUDA graphs",
}


class SelfCheckWarning(RuntimeWarning):
    """A fast op failed its load-time self-check; the model runs on the next path."""


@dataclass
class SelfCheckReport:
    device: str
    linear: str = "none"  # the int4 linears' path (LINEAR_PATHS), "none" without int4 layers
    fused_mlp: bool = False
    fused_norm: bool = False
    fused_decode: bool = False
    cuda_graph: bool = False  # the fused step may be recorded and replayed as a CUDA graph
    kv_cache_int8: bool = False  # the cache kind the fused step was checked with
    triton: bool = False  # whether the Triton kernels were allowed (CUDA with Triton; the interpreter in tests)
    checked: bool = True  # False: the fast paths were trusted unchecked (check=False)
    checks: list[Check] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # modules swapped, per kind
    seconds: float = 0.0
    first_run: dict | None = None  # the child-process check's outcome (first_run.py), None when not used

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict:
        return asdict(self)


class Gate(Protocol):
    """Decides where each op's check happens."""

    def decided(self, op: str) -> Check | None:
        """An outcome reached elsewhere (the op's check is not run here), or None: run it here."""

    def ran(self, check: Check) -> None:
        """Told each outcome of a check that ran here."""

    def summary(self) -> dict | None:
        """What the report keeps as `first_run` (None: no first-run check)."""


class InProcess:
    """Every check runs here, in this process (the default)."""

    def decided(self, op: str) -> Check | None:
        return None

    def ran(self, check: Check) -> None:
        pass

    def summary(self) -> None:
        return None


class _Run:
    """One model's checks: runs them (as the gate says), records them, warns once per failed op."""

    def __init__(self, llm, report: SelfCheckReport, enabled: bool, gate: Gate):
        self.llm, self.report, self.enabled, self.gate = llm, report, enabled, gate
        self.device = llm.device
        self.ins = Inputs(self.device, llm.dtype)

    def passes(self, op: str, fn) -> bool:
        if not self.enabled:
            return True
        check = self.gate.decided(op)
        if check is None:
            check = selfcheck.run_check(op, fn, self.device)
            self.gate.ran(check)
            if not check.passed:
                warnings.warn(f"edge-vlm self-check: {op} failed ({check.reason}); {FALLBACK_TEXT[op]}",
                              SelfCheckWarning, stacklevel=2)
        self.report.checks.append(check)
        return check.passed


def layers_per_shape(llm: nn.Module) -> list[WQLinear]:
    """One of the model's own int4 layers per (in, out, group, bias) shape, in model order."""
    seen: dict[tuple, WQLinear] = {}
    for m in llm.modules():
        if isinstance(m, WQLinear):
            seen.setdefault((m.in_features, m.out_features, m.group_size, m.bias is not None), m)
    return list(seen.values())


def _torch_int4_unsupported(device: torch.device) -> str | None:
    """Why torch's int4 matmul cannot run here before trying (None: try it)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(device)
        return f"needs compute capability 8.0 or newer, this GPU has {major}.{minor}"
    return None


def torch_int4_reason(layers: list[WQLinear], ins: Inputs) -> str | None:
    """Why torch's int4 matmul is wrong on these layers (None: it is right), decode and prefill rows."""

    if (reason := _torch_int4_unsupported(ins.device)) is not None:
        return reason
    compute = int4_ops(ins.device).compute_dtype
    for layer in layers:
        fast = TorchInt4Linear(layer)
        for rows in (selfcheck.DECODE_ROWS, selfcheck.PREFILL_ROWS):
            if (reason := selfcheck.check_linear(fast, layer, rows, ins, compute)) is not None:
                return f"{rows} row(s): {reason}"
    return None


def _choose_linear(run: _Run, triton: bool) -> str:
    layers = layers_per_shape(run.llm)
    if not layers:
        return "none"
    ins = run.ins
    if triton:
        # optional: needs triton (the gpu extra)
        from .triton.modules import TritonW4Linear

        def triton_rows(rows):
            return lambda: next((r for layer in layers if (r := selfcheck.check_linear(
                TritonW4Linear.from_awq(layer), layer, rows, ins))), None)

        if run.passes("w4a16_gemv", triton_rows(selfcheck.DECODE_ROWS)) and run.passes(
                "w4a16_gemm", triton_rows(selfcheck.PREFILL_ROWS)):
            return "triton"
    fitting = [layer for layer in layers if torch_int4_fits(layer)]
    if not fitting:
        return "reference"

    def torch_int4():
        return torch_int4_reason(fitting, ins)

    return "torch_int4" if run.passes("torch_int4", torch_int4) else "reference"


def convert(llm: nn.Module, triton: bool, check: bool = True, gate: Gate | None = None,
            kv_cache_int8: bool = False) -> SelfCheckReport:
    """Check each op kind on `llm` (a DecoderLM), swap in the paths that passed; returns the report.

    `triton`: whether the Triton kernels may be used (CUDA with Triton, or the interpreter on CPU
    tensors in tests); without, only torch's int4 matmul is tried. `check=False` trusts every
    fast path unchecked (benchmarks and tests that compare the paths themselves). `gate`: where
    each check runs (default: here); the first-run check's gates are in first_run.py.
    """
    start = time.perf_counter()
    gate = gate or InProcess()
    report = SelfCheckReport(str(llm.device), checked=check, triton=triton, first_run=gate.summary())
    run = _Run(llm, report, check, gate)
    ins = run.ins
    report.linear = _choose_linear(run, triton)
    if triton:
        # optional: needs triton (the gpu extra)
        from .triton.modules import fusable, fused_mlp

        mlps = (layer.mlp for layer in llm.modules() if isinstance(layer, DecoderLayer) and fusable(layer.mlp))
        mlp = next(mlps, None) if report.linear == "triton" else None
        if mlp is not None:
            report.fused_mlp = run.passes("epilogue", lambda: _first_reason(
                selfcheck.check_mlp(fused_mlp(mlp), mlp, rows, ins) for rows in
                (selfcheck.DECODE_ROWS, selfcheck.PREFILL_ROWS)))
        norm = llm.norm if isinstance(llm.norm, (RMSNorm, LayerNorm1P)) else None
        report.fused_norm = norm is not None and run.passes("fused_norm", lambda: selfcheck.check_norm(norm, ins))
    report.counts = _swap(llm, report, triton)
    if triton:
        check_decode(llm, report, gate, kv_cache_int8)
    report.seconds = time.perf_counter() - start
    return report


def check_decode(llm: nn.Module, report: SelfCheckReport, gate: Gate | None = None,
                 kv_cache_int8: bool = False) -> bool:
    """Check the fused decode step's own kernels, the whole step and its CUDA-graph replay, over
    `llm` as converted and with the KV-cache kind it uses now; records (and returns) whether the
    step may serve. `make_engine` calls it again when the cache kind changed after loading."""
    run = _Run(llm, report, report.checked, gate or InProcess())
    ins = run.ins
    int8 = report.kv_cache_int8 = kv_cache_int8
    report.fused_decode = report.fused_norm and run.passes(
        "rotary_kv", lambda: selfcheck.check_rotary_kv(llm, int8, ins)) and run.passes(
        "decode_attention", lambda: selfcheck.check_decode_attention(llm, int8, ins)) and run.passes(
        "fused_decode_step", lambda: selfcheck.check_fused_step(llm, int8, ins))
    report.cuda_graph = report.fused_decode and run.passes(
        "cuda_graph", lambda: selfcheck.check_graph_replay(llm, int8, ins))
    return report.fused_decode


def _first_reason(reasons) -> str | None:
    return next((r for r in reasons if r is not None), None)


def _swap(llm: nn.Module, report: SelfCheckReport, triton: bool) -> dict[str, int]:
    counts: dict[str, int] = {}
    if report.linear == "triton":
        # optional: needs triton (the gpu extra)
        from .triton.modules import convert as triton_convert

        return triton_convert(llm, fuse_mlps=report.fused_mlp, norms=report.fused_norm)
    if report.linear == "torch_int4":

        counts.update(torch_int4_convert(llm))
    if triton and report.fused_norm:
        # optional: needs triton (the gpu extra)
        from .triton.modules import convert_norms

        counts.update(convert_norms(llm))
    return counts
