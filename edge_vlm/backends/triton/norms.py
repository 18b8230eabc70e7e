"""Fused residual add + RMSNorm / LayerNorm1P: one read of x and the residual, two writes.

`add_norm(x, residual, weight, bias, eps, kind)` returns (norm(x + residual), x + residual).
The sum is rounded to x's dtype before normalising, as the unfused model does when it adds the
residual in fp16; statistics are computed in fp32.
RMSNorm rounds the normalised value to x's dtype before scaling by the weight (as llm.RMSNorm
does); LayerNorm1P scales by (weight + 1) rounded to the weight's dtype (as llm.LayerNorm1P does).
"""

from __future__ import annotations

import torch
import triton.language as tl

from .launcher import kernel, next_power_of_2

RMS, LAYERNORM1P = 0, 1


@kernel
def _add_norm(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, sum_ptr, D, eps, stride_x, stride_r, stride_y, stride_s,
              HAS_RESIDUAL: tl.constexpr, KIND: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    ok = d < D
    x = tl.load(x_ptr + row * stride_x + d, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(r_ptr + row * stride_r + d, mask=ok, other=0.0).to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + d, x, mask=ok)
    h = x.to(tl.float32)
    w = tl.load(w_ptr + d, mask=ok, other=0.0)
    if KIND == 0:
        var = tl.sum(h * h, axis=0) / D
        n = (h * tl.rsqrt(var + eps)).to(y_ptr.dtype.element_ty).to(tl.float32)
        y = n * w.to(tl.float32)
    else:
        mean = tl.sum(h, axis=0) / D
        c = tl.where(ok, h - mean, 0.0)
        var = tl.sum(c * c, axis=0) / D
        gamma = (w.to(tl.float32) + 1.0).to(w_ptr.dtype.element_ty).to(tl.float32)
        y = c * tl.rsqrt(var + eps) * gamma + tl.load(b_ptr + d, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + d, y.to(y_ptr.dtype.element_ty), mask=ok)


def add_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
             eps: float, kind: int = RMS) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual); with residual None: (norm(x), x)."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    has_res = residual is not None
    r2 = residual.reshape(-1, d) if has_res else x2
    s = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if has_res else x2
    _add_norm.on(x.device)[(x2.shape[0],)](x2, r2, weight, bias if bias is not None else weight, y, s, d, eps,
                                           x2.stride(0), r2.stride(0), y.stride(0), s.stride(0),
                                           HAS_RESIDUAL=has_res, KIND=kind, BLOCK_D=next_power_of_2(d))
    return y.reshape(x.shape), (s.reshape(x.shape) if has_res else x)
