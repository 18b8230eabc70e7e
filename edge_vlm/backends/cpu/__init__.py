"""The CPU backend: torch's int4 CPU matmul for AWQ linears, bfloat16 where this CPU is faster at it.

- int4_linear.py: `CpuInt4Linear`, a `WQLinear` repacked for `_weight_int4pack_mm_for_cpu`,
  with bfloat16 activations where this CPU runs that fastest (then it beats even dense fp32 at
  every size), else fp32 activations for decode-sized inputs only. Layers with a group size the
  kernel lacks (not 32-256) stay `WQLinear`.
- timing.py: the once-per-process measurement both bf16 choices rest on.
- `convert`: the swaps, plus the vision tower and projector in bfloat16 where dense bf16
  matmuls beat fp32.
Norms, attention and the decode loop stay the plain torch modules.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...models.quant_linear import WQLinear
from ..swap import swap_modules
from .int4_linear import CpuInt4Linear, cpu_int4_available, cpu_int4_fits
from .timing import cpu_bf16_matmul_is_faster


def convert(llm: nn.Module | None, vision: nn.Module | None, projector: nn.Module | None) -> dict[str, int]:
    """Swap `llm`'s AWQ linears for CpuInt4Linear (None: llama.cpp runs the LLM) and maybe cast the
    vision side; returns the counts."""
    counts: dict[str, int] = {}
    if llm is not None and cpu_int4_available():
        counts = swap_modules(llm, lambda m: isinstance(m, WQLinear) and cpu_int4_fits(m), CpuInt4Linear,
                              "cpu_int4_linear", keep_inside=CpuInt4Linear)  # its fp32 fallback stays a WQLinear
    counts.update(_vision_to_bf16(vision, projector))
    return counts


def _vision_to_bf16(vision: nn.Module | None, projector: nn.Module | None) -> dict[str, int]:
    """The vision tower and projector in bfloat16 where dense bf16 matmuls are the faster ones.
    The tower is pure matmul work (a 384 px image is 729 tokens through 27 layers), and the
    towers were trained in bf16; the LLM stays as loaded (`encode_images` casts between)."""
    if vision is None or next(vision.parameters()).dtype != torch.float32 or not cpu_bf16_matmul_is_faster():
        return {}
    vision.to(torch.bfloat16)
    if projector is not None:
        projector.to(torch.bfloat16)
    return {"bf16_vision": 1}
