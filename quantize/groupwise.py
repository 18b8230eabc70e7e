"""Group-wise asymmetric integer quantization of a weight matrix (the W in W4A16).

Each run of `group_size` consecutive input channels of one output row shares a scale and an
integer zero point: q = clamp(round(w / s) + z, 0, 2^b - 1), w ~ (q - z) * s. The scale is
rounded to fp16 *before* the integers are computed, because fp16 is what the checkpoint
stores: the fake-quantized weight used during the search is then bit-for-bit the weight the
runtime dequantizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    q: torch.Tensor       # [N, K] integers in 0..2^b-1 (uint8)
    zeros: torch.Tensor   # [N, K/G] integers
    scales: torch.Tensor  # [N, K/G] fp16

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        n, k = self.q.shape
        g = k // self.scales.shape[1]
        q = self.q.to(dtype).view(n, -1, g)
        return ((q - self.zeros.to(dtype)[..., None]) * self.scales.to(dtype)[..., None]).view(n, k)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    return w.reshape(n, k // group_size, group_size)


def quantize_weight(w: torch.Tensor, group_size: int, bits: int = 4,
                    lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize w [N, K]. `lo`/`hi` [N, K/G] clip each group's range (the clipping search)."""
    wg = _grouped(w.float(), group_size)
    scales, zeros = group_grid(wg.amin(-1) if lo is None else lo, wg.amax(-1) if hi is None else hi, bits)
    q = round_to_grid(wg, scales[..., None], zeros[..., None], bits)
    return QuantizedWeight(q.reshape(w.shape).to(torch.uint8), zeros.to(torch.uint8), scales.to(torch.float16))


def group_grid(wmin: torch.Tensor, wmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, integer zero point) of groups whose range is [wmin, wmax]; the scale already fp16-rounded."""
    qmax = 2**bits - 1
    wmin, wmax = wmin.float().clamp(max=0), wmax.float().clamp(min=0)  # 0 must be representable (exactly)
    scales = ((wmax - wmin) / qmax).clamp(min=1e-5).to(torch.float16).float()
    return scales, torch.round(-wmin / scales).clamp(0, qmax)


def round_to_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """The integers 0..2^b-1 nearest to w on the grid (q - z) * s."""
    return torch.div(w, scales).round_().add_(zeros).clamp_(0, 2**bits - 1)  # one buffer, not four


def fake_quantize(w: torch.Tensor, group_size: int, bits: int = 4,
                  lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> torch.Tensor:
    """quantize then dequantize, in w's dtype: the values of `quantize_weight(...).dequantize()`, computed
    in float without the integer tensors (the searches call it once per candidate)."""
    wg = _grouped(w.float(), group_size)
    scales, zeros = group_grid(wg.amin(-1) if lo is None else lo, wg.amax(-1) if hi is None else hi, bits)
    scales, zeros = scales[..., None], zeros[..., None]
    q = round_to_grid(wg, scales, zeros, bits)
    return q.sub_(zeros).mul_(scales).reshape(w.shape).to(w.dtype)
