"""The elementwise MLP epilogue silu(gate) * up, one read and one write.

Used after the prefill GEMM over gate+up; at decode it is fused into the W4A16 GEMV itself
(Nemotron's relu(x)^2 is fused into both the GEMV and the GEMM).
"""

from __future__ import annotations

import torch
import triton.language as tl

from .launcher import kernel

BLOCK = 1024


@kernel
def _silu_mul(g_ptr, u_ptr, y_ptr, numel, cols, stride_g, stride_u, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < numel
    r = i // cols
    c = i % cols
    g = tl.load(g_ptr + r * stride_g + c, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r * stride_u + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, (g / (1.0 + tl.exp(-g)) * u).to(y_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for 2-D inputs whose rows may be strided views (e.g. halves of one matrix)."""
    if gate.shape != up.shape or gate.dim() != 2 or gate.stride(1) != 1 or up.stride(1) != 1:
        raise ValueError("silu_mul takes two 2-D tensors of the same shape with contiguous rows")
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    numel = gate.numel()
    _silu_mul.on(gate.device)[((numel + BLOCK - 1) // BLOCK,)](gate, up, y, numel, gate.shape[1], gate.stride(0),
                                                               up.stride(0), BLOCK=BLOCK)
    return y

