"""`TorchInt4Linear`: an AWQ `WQLinear` repacked for torch's own int4 matmul.

On CUDA that is `_weight_int4pack_mm` (tinygemm: sm80 and newer, bfloat16 activations); on CPU
tensors its twin `_weight_int4pack_mm_for_cpu` (float32 activations), so the chain that picks
this module (backends/selfcheck.py) runs with a real int4 kernel in the CPU tests too. Both read
the CPU int4 format of int4_formats (q [N', K] in 0..15, scales_zeros (s, (8 - z) * s), since
torch computes w = (q - 8) * s + m): the AWQ zero points convert exactly. Only the packing call
differs: CUDA's converter takes two weights per byte (`pair_nibbles`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ...formats.int4_formats import cpu_int4_output, cpu_int4_rows, gemm_to_cpu_int4_scales_zeros, gemm_to_cpu_int4_weight
from ...models.quant_linear import WQLinear

GROUP_SIZES = (32, 64, 128, 256)  # what both kernels are built for


def torch_int4_fits(module: WQLinear) -> bool:
    """Whether torch's int4 kernels take this layer: group 32-256 and K a multiple of 32 (two
    16-wide k-tiles per int32 of CUDA's layout)."""
    return module.group_size in GROUP_SIZES and module.in_features % 32 == 0


def pair_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int q [N, K] in 0..15 -> uint8 [N, K/2], byte i holding q[:, 2i] in its high nibble and
    q[:, 2i + 1] in its low one: the input `_convert_weight_to_int4pack` (CUDA) documents
    ("[n][k / 2] uint8") and unpacks (high nibble first)."""
    return ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8)


def inner_k_tiles(k: int) -> int:
    """The most 16-wide k-tiles per packed word group that divide K (8 means 16-byte loads)."""
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


@dataclass(frozen=True)
class Int4Ops:
    """torch's int4 kernels for one device type: packing (q [N', K] int32 -> opaque) and matmul."""
    pack: Callable[[torch.Tensor], torch.Tensor]
    mm: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor]
    compute_dtype: torch.dtype


# looked up on use, not at import: a torch without the op raises then, inside the self-check
CUDA_OPS = Int4Ops(lambda q: torch.ops.aten._convert_weight_to_int4pack(pair_nibbles(q), inner_k_tiles(q.shape[1])),
                   lambda x, w, g, sz: torch.ops.aten._weight_int4pack_mm(x, w, g, sz), torch.bfloat16)
CPU_OPS = Int4Ops(lambda q: torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
                  lambda x, w, g, sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, g, sz), torch.float32)


def int4_ops(device: torch.device) -> Int4Ops:
    return CUDA_OPS if device.type == "cuda" else CPU_OPS


class TorchInt4Linear(nn.Module):
    """y = x @ dequantize(w) + bias through torch's int4 matmul; activations cast to the kernel's
    dtype (bfloat16 on CUDA: 2^-8 relative per element, inside the int4 weights' own error)."""

    def __init__(self, awq: WQLinear, ops: Int4Ops | None = None):
        super().__init__()
        self.ops = ops or int4_ops(awq.qweight.device)
        self.in_features, self.out_features, self.group_size = awq.in_features, awq.out_features, awq.group_size
        self.register_buffer("int4_packed", _pack(awq, self.ops))
        sz = gemm_to_cpu_int4_scales_zeros(awq.qzeros, awq.scales)
        self.register_buffer("int4_scales_zeros", sz.to(self.ops.compute_dtype).contiguous())
        self.register_buffer("bias", awq.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        x2 = x.reshape(rows, -1).to(self.ops.compute_dtype).contiguous()
        y = self.ops.mm(x2, self.int4_packed, self.group_size, self.int4_scales_zeros)
        return cpu_int4_output(y, x, self.out_features, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"compute={str(self.ops.compute_dtype).replace('torch.', '')}")


def _pack(awq: WQLinear, ops: Int4Ops) -> torch.Tensor:
    """The whole packed weight, one block of output rows at a time (bounded temporaries): both
    packed layouts keep rows (or groups of 8 rows) along their first dimension."""
    n_pad = cpu_int4_rows(awq.out_features)
    out = None
    for a, q in gemm_to_cpu_int4_weight(awq.qweight):
        part = ops.pack(q.contiguous())
        per_unit = q.shape[0] // part.shape[0]  # output rows per index of dim 0 (1 on CPU, 8 on CUDA)
        if out is None:
            out = part.new_empty((n_pad // per_unit, *part.shape[1:]))
        out[a // per_unit:a // per_unit + part.shape[0]] = part
    return out
