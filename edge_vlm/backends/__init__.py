"""The device's fast path, chosen in one place: one folder per backend, plain torch otherwise.

- triton/ (CUDA with Triton installed): WQLinear -> `TritonW4Linear` (W4A16 GEMV/GEMM),
  quantized MLPs -> fused-epilogue MLPs, RMSNorm / LayerNorm1P -> fused norm kernels, and the
  CUDA-graph decode engine over a fused static decode step.
- cuda_int4/ (CUDA without Triton, e.g. Windows RTX; and the Triton backend's fallback for int4
  linears): WQLinear -> `TorchInt4Linear` (torch's int4 CUDA matmul, sm80+).
- cpu/ (CPU): WQLinear -> `CpuInt4Linear` (torch's int4 CPU matmul), and the vision tower and
  projector in bfloat16 where this CPU runs bf16 matmuls faster.
- anything else (meta, ...): the plain torch modules as loaded. They are also the reference
  every backend is tested against (`load_model(fast_path=False)`).
On CUDA every fast op kind is self-checked at load before it serves (gpu_path.py, selfcheck.py):
one that fails runs on the next path, with one `SelfCheckWarning`. Before that, the first time
a key (GPU, versions, model shape family) is seen, every check runs in a child process, where a
crash or a hang costs nothing; its verdict is kept in the cache folder (first_run.py, verdicts.py).
Modules are swapped by type (WQLinear, MLP, RMSNorm, LayerNorm1P), never by name. Every engine
here provides `contracts.Engine`; `torch_engine.TorchEngine` is the reference.

May import the floors below it (contracts, formats, text, imaging, models); never the model
assembly, the session, loading or the CLI (tests/runtime/test_layout.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .torch_engine import TorchEngine
from . import cpu, first_run, gpu_path
from .first_run import FirstRunWarning
from .gpu_path import SelfCheckReport, SelfCheckWarning
from .stand_in import shape_family
from .triton import triton_available

BACKENDS = ("triton", "cuda_int4", "cpu")

__all__ = ["BACKENDS", "FastPath", "FirstRunWarning", "SelfCheckReport", "SelfCheckWarning", "choose_backend", "make_engine",
           "optimize_for_device"]


def choose_backend(device: torch.device) -> str | None:
    if device.type == "cuda":
        return "triton" if triton_available() else "cuda_int4"
    if device.type == "cpu":
        return "cpu"
    return None


class FastPath(NamedTuple):
    """What `optimize_for_device` did: modules swapped per kind (empty: the plain torch path kept),
    and on the CUDA backends the self-check's report (which fast ops passed; `make_engine` reads it)."""

    counts: dict[str, int]
    report: SelfCheckReport | None = None


def optimize_for_device(llm, vision=None, projector=None, *, backend: str | None = None, check: bool = True,
                        child_check: bool | None = None, recheck: bool = False,
                        kv_cache_int8: bool = False) -> FastPath:
    """Swap modules of a model's parts in place for the device's fast path: `llm` (a DecoderLM, or None
    or a meta-device shape when llama.cpp runs the language model), and the vision tower and projector.

    `backend` overrides the choice ("triton" on CPU runs the kernels through Triton's
    interpreter: that is how the tests exercise the CUDA path without a GPU). On the CUDA
    backends each op kind is self-checked first (`check=False` trusts them unchecked), with the
    KV-cache kind the engines will use (`kv_cache_int8`), and the report is returned.
    `child_check`: run the first-run check in a child process first (None: on CUDA only; True also
    on CPU tensors, through the interpreter, as the tests do); `recheck` discards its kept verdict
    for this model first.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    first = next(iter(llm.parameters()), None) if llm is not None else None
    if first is None or first.device.type == "meta":  # no torch LLM here (llama.cpp holds it, or a shape only)
        return FastPath(_vision_only(vision, projector))
    backend = backend or choose_backend(first.device)
    if backend in ("triton", "cuda_int4"):
        triton = backend == "triton"
        family = shape_family(llm, triton, kv_cache_int8)
        isolate = check and first_run.needs_check(family) and (
            first.device.type == "cuda" if child_check is None else child_check)
        gate = first_run.gate_for(family, first.device, recheck) if isolate else None
        report = gpu_path.convert(llm, triton=triton, check=check, gate=gate, kv_cache_int8=kv_cache_int8)
        return FastPath(report.counts, report)
    if backend == "cpu":
        return FastPath(cpu.convert(llm, vision, projector))
    return FastPath({})


def _vision_only(vision, projector) -> dict[str, int]:
    """The vision side's CPU choice (bf16 where faster) when the LLM is not a torch module of ours."""
    first = next(iter(vision.parameters()), None) if vision is not None else None
    if first is None or first.device.type != "cpu":
        return {}
    return cpu.convert(None, vision, projector)


def make_engine(llm, max_context: int, kv_cache_int8: bool = False,
                report: SelfCheckReport | None = None) -> TorchEngine:
    """The engine `llm` passed the self-check for (`report`, from `optimize_for_device`): CUDA-graph
    decode over the fused step (built to be the fastest; its speed is unmeasured, no GPU has run it
    in this project) when that step and its recording passed, else the plain one. A KV-cache kind
    other than the one checked has its fused step checked now (first in a child process, when the
    load's check was made in one); the report records the new outcome."""
    if report is None or not report.triton:
        return TorchEngine(llm, max_context, kv_cache_int8)
    if report.checked and report.kv_cache_int8 != kv_cache_int8:
        gate = None
        if report.first_run is not None:
            gate = first_run.gate_for(dict(report.first_run["family"], kv_cache_int8=kv_cache_int8), llm.device)
        gpu_path.check_decode(llm, report, gate, kv_cache_int8)
    if report.fused_decode and report.cuda_graph:
        # optional: needs triton (the gpu extra)
        from .triton.cuda_graph import CUDAGraphEngine

        return CUDAGraphEngine(llm, max_context, kv_cache_int8=kv_cache_int8)
    return TorchEngine(llm, max_context, kv_cache_int8)
