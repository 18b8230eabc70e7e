"""`optimize_for_device(model)`: pick the fast path for where the model lives.

- CUDA with Triton: AWQ linears -> `TritonW4Linear` (W4A16 GEMV/GEMM), quantized MLPs -> fused
  epilogue MLPs, norms -> fused norm kernels. Decode attention, rotary+KV write and the
  residual-fused norms are used by the CUDA-graph decode step (edge_vlm.cuda_engine).
- CPU: AWQ linears -> `CpuInt4Linear` (torch's int4 CPU matmul), with bfloat16 activations
  where this CPU runs that fastest (then it beats even dense fp32 at every size), else fp32
  activations for decode-sized inputs only. Layers with a group size that kernel lacks (not
  32-256) stay as they are. Where dense bf16 matmuls beat fp32, the vision tower and projector run in bf16.
- meta (or anything else): nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import triton_available
from .modules import (CpuInt4Linear, TritonNorm, TritonReluSqMLP, TritonW4Linear, cpu_bf16_matmul_is_faster,
                      cpu_int4_available, cpu_int4_fits, gated_mlp, is_awq_linear)


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
    of each kind were swapped, and records the backend as `llm.kernel_backend`.
    """
    llm = getattr(model, "llm", model)
    first = next(iter(llm.parameters()), None)
    if first is None or first.device.type == "meta":
        return {}
    backend = backend or choose_backend(first.device)
    counts: dict[str, int] = {}
    if backend == "triton":
        counts = _to_triton(llm)
    elif backend == "cpu":
        if cpu_int4_available():
            counts = _swap(llm, lambda m: is_awq_linear(m) and cpu_int4_fits(m), CpuInt4Linear, "cpu_int4_linear")
        counts.update(_vision_to_bf16(model))
    llm.kernel_backend = backend if counts or backend == "triton" else "torch"
    return counts


def _vision_to_bf16(model) -> dict[str, int]:
    """CPU: the vision tower and projector in bfloat16 where dense bf16 matmuls are the faster
    ones. The tower is pure matmul work (a 384 px image is 729 tokens through 27 layers), and
    the towers were trained in bf16; the LLM stays as loaded (`encode_images` casts between)."""
    vision = getattr(model, "vision", None)
    if vision is None or next(vision.parameters()).dtype != torch.float32 or not cpu_bf16_matmul_is_faster():
        return {}
    vision.to(torch.bfloat16)
    if getattr(model, "projector", None) is not None:
        model.projector.to(torch.bfloat16)
    return {"bf16_vision": 1}


def _swap(root: nn.Module, match, make, label: str) -> dict[str, int]:
    """Replace every submodule that `match`es with `make(module)`, one at a time.

    Only names are collected up front: each replaced module is freed before the next is made, so
    converting a model costs one layer of extra memory, not a second copy of all its weights.
    """
    names = []
    for name, module in root.named_modules():
        parent_name = name.rpartition(".")[0]
        parent = root.get_submodule(parent_name) if parent_name else root
        if name and not isinstance(parent, CpuInt4Linear) and match(module):  # a fast module's own fallback stays
            names.append(name)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, make(getattr(parent, child)))
    return {label: len(names)} if names else {}


def _to_triton(llm: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer in getattr(llm, "layers", []):
        mlp = layer.mlp
        if getattr(mlp, "gated", False) and is_awq_linear(mlp.gate_proj) and is_awq_linear(mlp.up_proj):
            layer.mlp = gated_mlp(mlp)
            counts["fused_gated_mlp"] = counts.get("fused_gated_mlp", 0) + 1
        elif not getattr(mlp, "gated", True) and is_awq_linear(mlp.up_proj):
            down = TritonW4Linear.from_awq(mlp.down_proj) if is_awq_linear(mlp.down_proj) else mlp.down_proj
            layer.mlp = TritonReluSqMLP(TritonW4Linear.from_awq(mlp.up_proj), down)
            counts["fused_relu2_mlp"] = counts.get("fused_relu2_mlp", 0) + 1
    counts.update(_swap(llm, is_awq_linear, TritonW4Linear.from_awq, "w4a16_linear"))
    counts.update(_swap(llm, lambda m: type(m).__name__ in ("RMSNorm", "LayerNorm1P"), TritonNorm, "fused_norm"))
    return counts
