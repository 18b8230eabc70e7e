"""Shared by the kernel tests: devices to run on, random int4 weights, and AWQ layers whose
buffers come from the spec's reference packer (tests/awq_reference.py) and whose forward is
the spec's dequantization, so the fast modules are checked against more than the runtime itself.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from edge_vlm.models.quant_linear import WQLinear
from tests.awq_reference import awq_pack

# CPU: kernels run through Triton's interpreter (no TRITON_INTERPRET needed; see backends/triton/launcher.py).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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


class SpecWQLinear(WQLinear):
    """A WQLinear (so the backends swap it like a loaded one) packed by the reference packer, with
    the spec's forward: dequantize exactly in float64, then matmul."""

    def __init__(self, q, z, s, group: int, bias: torch.Tensor | None = None):
        k, n = q.shape
        super().__init__(k, n, group, 4, bias is not None, dtype=s.dtype)
        self.qweight.copy_(awq_pack(q))
        self.qzeros.copy_(awq_pack(z))
        self.scales.copy_(s)
        if bias is not None:
            self.bias.copy_(bias)
        self._q, self._z = q, z

    def forward(self, x):
        w = exact_dequant(self._q, self._z, self.scales, self.group_size).to(x.dtype).to(x.device)
        y = x @ w
        return y + self.bias.to(x.dtype) if self.bias is not None else y


def quantize_linear(linear: nn.Linear, group: int, seed: int) -> SpecWQLinear:
    """Round-to-nearest asymmetric int4 of an nn.Linear's weight (so the model stays sensible)."""
    w = linear.weight.detach().t().float()  # [K, N]
    k, n = w.shape
    wg = w.reshape(k // group, group, n)
    lo, hi = wg.amin(1), wg.amax(1)
    s = ((hi - lo).clamp_min(1e-5) / 15)
    z = (-lo / s).round().clamp(0, 15)
    q = (wg / s[:, None] + z[:, None]).round().clamp(0, 15).reshape(k, n).long()
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    return SpecWQLinear(q, z.long(), s.to(linear.weight.dtype), group, bias)


def fused_step(decoder, token_id: int) -> torch.Tensor:
    """One eager (uncaptured) FusedDecoder step at the cache's position, as the CUDA-graph engine
    replays it: logits [vocab]; the cache advances by one token."""
    decoder.token.fill_(token_id)
    decoder.pos.fill_(decoder.cache.position)
    logits = decoder.forward()[0]
    decoder.cache.advance(1)
    return logits


def quantize_layers(llm, group: int = 32) -> None:
    """Every nn.Linear inside the decoder layers as a SpecWQLinear (what a loaded AWQ model holds)."""
    seed = 0
    for layer in llm.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, quantize_linear(child, group, seed))
                    seed += 1
