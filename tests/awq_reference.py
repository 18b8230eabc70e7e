"""The AutoAWQ GEMM packing written from its definition, for tests: the one reference packer.

Deliberately independent of edge_vlm (a per-nibble loop over the spec's order, not the
runtime's shift tables), so a bug in the runtime's packing cannot hide behind the same bug here.
"""

from __future__ import annotations

import torch

SPEC_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AutoAWQ int32 holds column 8c + SPEC_ORDER[i]


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[R, C] ints 0..15 -> int32 [R, C/8] in the AutoAWQ GEMM order."""
    r, c = values.shape
    out = torch.zeros((r, c // 8), dtype=torch.int64)
    for block in range(c // 8):
        for nibble, col in enumerate(SPEC_ORDER):
            out[:, block] |= values[:, 8 * block + col].long() << (4 * nibble)
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.to(torch.int32)


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ GEMM int32 [R, C/8] -> int64 values 0..15 [R, C]."""
    r, w = packed.shape
    out = torch.zeros(r, w * 8, dtype=torch.int64)
    p = packed.to(torch.int64) & 0xFFFFFFFF
    for nibble, col in enumerate(SPEC_ORDER):
        out[:, col::8] = (p >> (4 * nibble)) & 0xF
    return out
