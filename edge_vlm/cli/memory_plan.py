"""What `edge-vlm info` says a model holds: parameters counted as the numbers the weights stand for,
and the memory of the backend and device that will run it, part by part, from the shapes alone
(a model loaded on the meta device), so it is said before anything is loaded or exported."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends.cpu.timing import cpu_bf16_matmul_is_faster
from ..backends.llamacpp.gguf_export import gguf_module, plan_tensors
from ..vlm import weight_bytes

LLAMACPP_KV_BYTES = {"model": 2.0, "int8": 34 / 32}  # llama.cpp's F16 cache; Q8_0: 32 int8 + one fp16 scale


def parameter_count(module: torch.nn.Module | None) -> int:
    """Weights of `module` as numbers: a packed int4 `qweight` (int32) stands for 32 / w_bit = 8 weights per
    element, an int8 one for one each; other buffers (scales, zeros, rotary tables) are not parameters,
    except a quantized layer's `bias`. Tied tensors count once."""
    if module is None:
        return 0
    seen, total = set(), 0
    for m in module.modules():
        tensors = [(n, t, True) for n, t in m.named_parameters(recurse=False)]
        tensors += [(n, t, False) for n, t in m.named_buffers(recurse=False)]
        for name, t, is_param in tensors:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            if name == "qweight":
                total += t.numel() * (32 // getattr(m, "w_bit", 4) if t.dtype == torch.int32 else 1)
            elif is_param or name == "bias":
                total += t.numel()
    return total


@dataclass(frozen=True)
class MemoryPlan:
    """The parts a running model holds, in bytes, named as `edge-vlm info` prints them."""

    backend: str  # "llama.cpp" or "torch"
    device: str
    parts: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts)

    def named(self) -> dict[str, int]:
        return dict(self.parts)

    def line(self) -> str:
        parts = " + ".join(f"{name} {size_text(n)}" for name, n in self.parts)
        return f"{parts} = {size_text(self.total)} (not counted: Python, the libraries themselves, activations)"


def size_text(n: int) -> str:
    """GiB for what a laptop counts in GiB, MiB below (a tiny model's parts stay readable)."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def _as_bf16_bytes(module: torch.nn.Module) -> int:
    """Bytes after `module.to(torch.bfloat16)`: every floating tensor 2 bytes an element, the rest as is."""
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}.values()
    return sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in tensors)


def _vision_parts(model, device: str, vision_int8: bool) -> list[tuple[str, int]]:
    """The tower and projector as the device runs them: on a CPU where dense bf16 matmuls are measured
    faster, the fast path casts an fp32 tower to bf16 (backends/cpu: the same timing, once per process)."""
    if model.vision is None:
        return []
    dtype = next(model.projector.parameters()).dtype
    tower, projector = weight_bytes(model.vision), weight_bytes(model.projector)
    if device == "cpu" and next(model.vision.parameters()).dtype == torch.float32 and cpu_bf16_matmul_is_faster():
        dtype, tower, projector = torch.bfloat16, _as_bf16_bytes(model.vision), _as_bf16_bytes(model.projector)
    name = "int8 linears" if vision_int8 else _dtype_name(dtype)
    return [(f"vision tower {name}", tower), (f"projector {_dtype_name(dtype)}", projector)]


def llamacpp_plan(model, device: str, max_context: int, kv_cache: str, vision_int8: bool) -> MemoryPlan:
    """llama.cpp: the GGUF the first run exports (AWQ -> Q4_1, else Q8_0: gguf_cache.py), the tower and
    projector in the dtype our torch runs them in on `device`, llama.cpp's KV cache for `max_context`."""
    awq = any(hasattr(m, "qweight") and hasattr(m, "w_bit") for m in model.llm.modules())
    gguf = gguf_module()
    outtype = "q4_1-awq" if awq else "q8_0"
    tensors = sum(p.info(gguf)[2] for p in plan_tensors(model.llm, outtype))
    cfg = model.llm.cfg
    kv_elems = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * max_context
    kv_name = "Q8_0" if kv_cache == "int8" else "F16"
    return MemoryPlan("llama.cpp", device, (
        (f"GGUF {outtype}", tensors), *_vision_parts(model, device, vision_int8),
        (f"KV cache {kv_name} at {max_context} tokens", int(kv_elems * LLAMACPP_KV_BYTES[kv_cache]))))


def torch_plan(model, device: str, max_context: int, kv_cache: str, vision_int8: bool) -> MemoryPlan:
    """Our torch decoder: its weights as loaded for `device` (int4 packed, the rest in the device's dtype),
    the tower and projector likewise, and its KV cache in that dtype (fp32 on a CPU) or int8."""
    mem = model.memory_estimate(max_context)
    kv_name = "int8" if kv_cache == "int8" else _dtype_name(model.dtype)
    return MemoryPlan("torch", device, (
        (f"LLM weights {_dtype_name(model.dtype)}", weight_bytes(model.llm)), *_vision_parts(model, device, vision_int8),
        (f"KV cache {kv_name} at {max_context} tokens", mem["kv_cache"])))
