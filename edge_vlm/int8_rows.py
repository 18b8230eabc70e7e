"""Symmetric int8 with one scale per row: the KV cache's and the int8 embeddings' number format.

A module of its own so the KV cache can use it without importing the int4 layer module.
"""

from __future__ import annotations

import torch


def quantize_int8_rows(x: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] float -> (int8 [..., D], scales [...] in `scale_dtype`): symmetric per row (last dim).

    scale = max|row| / 127, rounded to `scale_dtype` before the integers are computed (they are
    exact for the scale as stored); integers rounded half away from zero, the rule the Triton
    KV-cache write uses too. Error per entry: at most half a step, max|row| / 254. Used for int8
    token embeddings (fp16 scales) and the int8 KV cache (fp32 scales).
    """
    x = x.float()
    scale = (x.abs().amax(dim=-1).clamp(min=1e-8) / 127).to(scale_dtype)
    y = x / scale.float()[..., None]
    q = torch.sign(y) * torch.floor(y.abs() + 0.5)
    return q.clamp(-127, 127).to(torch.int8), scale


def dequantize_int8_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()[..., None]).to(dtype)
