"""The device's fast path, chosen in one place: one folder per backend, plain torch otherwise.

- triton/ (CUDA with Triton installed): WQLinear -> `TritonW4Linear` (W4A16 GEMV/GEMM),
  quantized MLPs -> fused-epilogue MLPs, RMSNorm / LayerNorm1P -> fused norm kernels, and the
  CUDA-graph decode engine over a fused static decode step.
- cpu/ (CPU): WQLinear -> `CpuInt4Linear` (torch's int4 CPU matmul), and the vision tower and
  projector in bfloat16 where this CPU runs bf16 matmuls faster.
- anything else (meta, CUDA without Triton, ...): the plain torch modules as loaded. They are
  also the reference every backend is tested against (`load_model(fast_path=False)`).
Modules are swapped by type (WQLinear, MLP, RMSNorm, LayerNorm1P), never by name.
"""

from __future__ import annotations

import torch

from ..generate import Engine
from . import cpu
from .triton import triton_available

BACKENDS = ("triton", "cpu")


def choose_backend(device: torch.device) -> str | None:
    if device.type == "cuda" and triton_available():
        return "triton"
    if device.type == "cpu":
        return "cpu"
    return None


def optimize_for_device(model, backend: str | None = None) -> dict[str, int]:
    """Swap modules of `model` (a VisionLanguageModel or a DecoderLM) in place for the fast path.

    `backend` overrides the choice ("triton" on CPU runs the kernels through Triton's
    interpreter: that is how the tests exercise them without a GPU). Returns how many modules
    of each kind were swapped: empty when the plain torch path is kept.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    llm = getattr(model, "llm", model)
    first = next(iter(llm.parameters()), None)
    if first is None or first.device.type == "meta":
        return {}
    backend = backend or choose_backend(first.device)
    if backend == "triton":
        from .triton.modules import convert  # imports Triton: only once this backend is chosen

        return convert(llm)
    if backend == "cpu":
        return cpu.convert(llm, getattr(model, "vision", None), getattr(model, "projector", None))
    return {}


def make_engine(llm, max_context: int) -> Engine:
    """The fastest engine for where `llm` lives: CUDA-graph decode on CUDA with Triton, else the plain one."""
    if llm.device.type == "cuda" and triton_available():
        from .triton.cuda_graph import CUDAGraphEngine

        return CUDAGraphEngine(llm, max_context)
    return Engine(llm, max_context)
