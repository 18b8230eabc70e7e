"""Elementwise MLP epilogues: silu(gate) * up and relu(x)^2, one read and one write each.

Used after the prefill GEMM; at decode they are fused into the W4A16 GEMV itself.
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


@kernel
def _relu_sq(x_ptr, y_ptr, numel, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < numel
    x = tl.maximum(tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32), 0.0)
    tl.store(y_ptr + i, (x * x).to(y_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for 2-D inputs whose rows may be strided views (e.g. halves of one matrix)."""
    if gate.shape != up.shape or gate.dim() != 2 or gate.stride(1) != 1 or up.stride(1) != 1:
        raise ValueError("silu_mul takes two 2-D tensors of the same shape with contiguous rows")
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    numel = gate.numel()
    _silu_mul.on(gate.device)[((numel + BLOCK - 1) // BLOCK,)](gate, up, y, numel, gate.shape[1], gate.stride(0),
                                                               up.stride(0), BLOCK=BLOCK)
    return y


def relu_sq(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    _relu_sq.on(x.device)[((x.numel() + BLOCK - 1) // BLOCK,)](x, y, x.numel(), BLOCK=BLOCK)
    return y
