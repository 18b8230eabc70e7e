"""Int4 weight layouts: AutoAWQ's GEMM layout (what checkpoints hold) -> ours (what kernels read).

AutoAWQ GEMM layout (`WQLinear` buffers): `qweight` int32 [K, N/8], 8 output columns per
int32 with nibble i holding column 8c + AWQ_ORDER[i]; `qzeros` int32 [K/G, N/8] packed the
same way; `scales` fp16 [K/G, N]. Dequantized: w[k, n] = (q[k, n] - z[k//G, n]) * s[k//G, n].

Ours (`Int4Weight`): transposed so that one output row's weights are contiguous along K:
`qweight` int32 [N, K/8], nibble j of word w holding q[8w + j, n] in natural order. A block of
output rows then reads BLOCK_K/2 contiguous bytes per row (16-byte vector loads, coalesced
across the rows' threads), and the 8 nibbles of a word are 8 consecutive k, so one word
multiplies 8 consecutive activations. Scales stay fp16 and zeros become uint8, both [N, K/G]
so a row's group parameters are contiguous too. Repacking happens once, at load time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..awq_format import AWQ_ORDER, pack_int4_columns, pack_nibbles, unpack_nibbles

# Weights unpacked at a time while repacking. Unpacked, a weight takes ~20 bytes on its way
# through int32/int64 temporaries, so a whole 256k-vocabulary lm_head (786M weights) would need
# ~16 GB at once: on a Jetson, more than the board has. 4M weights per chunk bound it to ~80 MB.
REPACK_CHUNK_WEIGHTS = 1 << 22


def column_chunks(k: int, n: int) -> list[tuple[int, int]]:
    """[start, end) ranges of output columns, multiples of 64 wide, ~REPACK_CHUNK_WEIGHTS weights each."""
    step = max(64, REPACK_CHUNK_WEIGHTS // max(k, 1) // 64 * 64)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


@dataclass
class Int4Weight:
    qweight: torch.Tensor  # int32 [N, K/8]
    scales: torch.Tensor  # [N, K/G], the checkpoint's float dtype (fp16)
    zeros: torch.Tensor  # uint8 [N, K/G]
    in_features: int  # K
    out_features: int  # N
    group_size: int  # G

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def to(self, device) -> "Int4Weight":
        return Int4Weight(self.qweight.to(device), self.scales.to(device), self.zeros.to(device),
                          self.in_features, self.out_features, self.group_size)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ-packed int32 [R, C/8] -> int32 values 0..15 of shape [R, C]."""
    return unpack_nibbles(packed, AWQ_ORDER)


pack_awq = pack_int4_columns  # inverse of `unpack_awq`: int values 0..15 [R, C] -> AutoAWQ int32 [R, C/8]


def pack_rows(q: torch.Tensor) -> torch.Tensor:
    """int values 0..15 [N, K] -> int32 [N, K/8], nibble j of word w = q[n, 8w + j]."""
    return pack_nibbles(q)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_rows`: int32 [N, K/8] -> int32 values 0..15 [N, K]."""
    return unpack_nibbles(packed)


def repack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int4Weight:
    """AutoAWQ GEMM-layout buffers -> `Int4Weight` (same values, kernel-friendly layout).

    Done a block of output columns at a time (`column_chunks`), so the temporary memory stays
    small whatever the layer's size.
    """
    k, n = qweight.shape[0], qweight.shape[1] * 8
    packed = torch.empty((n, k // 8), dtype=torch.int32, device=qweight.device)
    for a, b in column_chunks(k, n):
        packed[a:b] = pack_rows(unpack_awq(qweight[:, a // 8:b // 8]).t().contiguous())
    z = unpack_awq(qzeros)[:, :n]  # [K/G, N]: 1/G of the weights, small
    return Int4Weight(packed, scales[:, :n].t().contiguous(), z.t().contiguous().to(torch.uint8), k, n, group_size)


def from_ints(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int4Weight:
    """Our layout straight from integer weights q [K, N], zeros and scales [K/G, N]."""
    k, n = q.shape
    return Int4Weight(pack_rows(q.t().contiguous()), scales.t().contiguous(),
                      zeros.t().contiguous().to(torch.uint8), k, n, group_size)


def dequantize(w: Int4Weight, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The plain-torch meaning of the weight: [K, N] in `dtype`, (q - z) * s per group."""
    q = unpack_rows(w.qweight).t().float()  # [K, N]
    g = torch.arange(w.in_features, device=q.device) // w.group_size
    s = w.scales.t().float()[g]
    z = w.zeros.t().float()[g]
    return ((q - z) * s).to(dtype)


def concat_outputs(parts: list[Int4Weight]) -> Int4Weight:
    """Stack several weights with the same K along N (e.g. gate and up into one matrix)."""
    k, g = parts[0].in_features, parts[0].group_size
    if any(p.in_features != k or p.group_size != g for p in parts):
        raise ValueError("only weights with the same in_features and group_size can be concatenated")
    return Int4Weight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                      torch.cat([p.zeros for p in parts]), k, sum(p.out_features for p in parts), g)
