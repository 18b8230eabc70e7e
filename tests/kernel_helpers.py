"""Shared by the kernel tests: devices to run on, and a reference AWQ packer written from the spec.

The packer is deliberately independent of edge_vlm (a per-nibble loop over the AutoAWQ order),
so a bug in the runtime's unpacking cannot hide behind the same bug in the test.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# CPU: kernels run through Triton's interpreter (no TRITON_INTERPRET needed; see kernels/launcher.py).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SPEC_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AutoAWQ int32 holds column 8c + SPEC_ORDER[i]


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[R, C] ints 0..15 -> int32 [R, C/8], AutoAWQ GEMM order (written from the format spec)."""
    r, c = values.shape
    out = torch.zeros((r, c // 8), dtype=torch.int64)
    for block in range(c // 8):
        for nibble, col in enumerate(SPEC_ORDER):
            out[:, block] |= values[:, 8 * block + col].long() << (4 * nibble)
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.to(torch.int32)


def random_int4(k: int, n: int, group: int, seed: int, scale_dtype=torch.float16):
    """Fresh random integer weights, zeros (never all zero) and positive scales."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=g)
    z = torch.randint(1, 15, (k // group, n), generator=g)
    s = (torch.rand((k // group, n), generator=g) * 0.02 + 0.004).to(scale_dtype)
    return q, z, s


def exact_dequant(q, z, s, group: int) -> torch.Tensor:
    """w[k, n] = (q - z[k // G]) * s[k // G] in float64 (exact for fp16 scales)."""
    rows = torch.arange(q.shape[0]) // group
    return (q.double() - z.double()[rows]) * s.double()[rows]


class AwqLinearStandIn(nn.Module):
    """A module holding AutoAWQ GEMM buffers, with the spec's plain forward (dequantize, matmul)."""

    def __init__(self, q, z, s, group: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = q.shape
        self.group_size, self.w_bit = group, 4
        self.register_buffer("qweight", awq_pack(q))
        self.register_buffer("qzeros", awq_pack(z))
        self.register_buffer("scales", s)
        self.register_buffer("bias", bias)
        self._q, self._z = q, z

    def forward(self, x):
        w = exact_dequant(self._q, self._z, self.scales, self.group_size).to(x.dtype).to(x.device)
        y = x @ w
        return y + self.bias.to(x.dtype) if self.bias is not None else y


def quantize_linear(linear: nn.Linear, group: int, seed: int) -> AwqLinearStandIn:
    """Round-to-nearest asymmetric int4 of an nn.Linear's weight (so the model stays sensible)."""
    w = linear.weight.detach().t().float()  # [K, N]
    k, n = w.shape
    wg = w.reshape(k // group, group, n)
    lo, hi = wg.amin(1), wg.amax(1)
    s = ((hi - lo).clamp_min(1e-5) / 15)
    z = (-lo / s).round().clamp(0, 15)
    q = (wg / s[:, None] + z[:, None]).round().clamp(0, 15).reshape(k, n).long()
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    return AwqLinearStandIn(q, z.long(), s.to(linear.weight.dtype), group, bias)


def fused_step(decoder, token_id: int) -> torch.Tensor:
    """One eager (uncaptured) FusedDecoder step at the cache's position, as the CUDA-graph engine
    replays it: logits [vocab]; the cache advances by one token."""
    decoder.token.fill_(token_id)
    decoder.pos.fill_(decoder.cache.position)
    logits = decoder.forward()[0]
    decoder.cache.advance(1)
    return logits
