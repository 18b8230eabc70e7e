"""The CUDA backend without Triton: torch's own int4 matmul for AWQ linears.

- int4_linear.py: `TorchInt4Linear`, a `WQLinear` repacked for `torch.ops.aten._weight_int4pack_mm`
  (tinygemm, sm80 and newer, the path gpt-fast uses). It is what a CUDA machine without Triton
  gets (Windows RTX), and the second link of the Triton backend's chain per int4 linear
  (Triton -> torch int4 -> dequantize + matmul). Selected only where its self-check passes
  (backends/selfcheck.py), so a packing mistake nobody could see without a GPU degrades to the
  reference `WQLinear` instead of giving wrong answers.
- `convert`: the swap. Norms, attention and the decode loop stay the plain torch modules.
"""

from __future__ import annotations

import torch.nn as nn

from ...models.quant_linear import WQLinear
from ..swap import swap_modules
from .int4_linear import TorchInt4Linear, torch_int4_fits


def convert(llm: nn.Module) -> dict[str, int]:
    """Swap `llm`'s AWQ linears that fit the kernel for TorchInt4Linear; returns the counts."""
    return swap_modules(llm, lambda m: isinstance(m, WQLinear) and torch_int4_fits(m), TorchInt4Linear,
                        "torch_int4_linear")
