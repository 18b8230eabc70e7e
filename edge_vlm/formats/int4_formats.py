"""Every 4-bit weight format the runtime reads or writes, as pure tensor conversions.

One module so that the nibble orders, the group layout and the dequantization rule are written
once and each format is defined next to the others it converts to (checkpoint files are read in
awq_format.py; the kernels that consume these tensors live in edge_vlm/backends/).

- AutoAWQ "GEMM" (what transformers and vLLM read, what `edge-vlm quantize` writes, and the one
  layout `WQLinear` holds in memory): `qweight` int32 [K, N/8], eight 4-bit values of input row k
  for output columns 8j..8j+7 in nibble order AWQ_ORDER (column 8j+0 in bits 0-3, 8j+2 in bits
  4-7, ...); `qzeros` int32 [K/G, N/8] packed the same way; `scales` fp16 [K/G, N].
  w[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n].
- NVIDIA TinyChat "v2" (llm-awq, the published VILA AWQ checkpoints): `qweight` int16 [N/4, K]
  with rows interleaved in fours and columns permuted for its CUDA kernel; `scales` and
  `scaled_zeros` fp16 [Kp, N], Kp = K/G rounded up to a multiple of 8 (zero rows of padding) and
  scaled_zeros = -z * s, so w = q * s + scaled_zero. Only read: converted to GEMM, exactly.
- Triton (`TritonInt4Weight`, what the W4A16 kernels read): GEMM transposed so one output row's
  weights are contiguous along K: `qweight` int32 [N, K/8], nibble j of word w holding
  q[8w + j, n] (natural order); scales and uint8 zeros [N, K/G]. A block of output rows then
  reads contiguous bytes per row (16-byte vector loads), and one word multiplies 8 consecutive
  activations.
- CPU int4 (the input of torch's `_convert_weight_to_int4pack_for_cpu`, whose packed result is
  torch's own opaque layout): int32 q [N', K] in 0..15 with N' = N rounded up to 16, and
  scales_zeros [K/G, N', 2] = (s, (8 - z) * s), since torch computes w = (q - 8) * s + m.
  Padding rows have zero scales, so they contribute zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import CheckpointError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of each AutoAWQ int32 holds column 8j + AWQ_ORDER[i]
NATURAL_ORDER = tuple(range(8))       # nibble i holds column 8j + i (the Triton layout)

# Weights unpacked at a time while repacking. Unpacked, a weight takes ~20 bytes on its way
# through int32/int64 temporaries, so a whole 256k-vocabulary lm_head (786M weights) would need
# ~16 GB at once: on a Jetson, more than the board has. 4M weights per chunk bound it to ~80 MB.
REPACK_CHUNK_WEIGHTS = 1 << 22


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 holding an unsigned 32-bit pattern -> int32 with the same bits (two's complement)."""
    x = x & 0xFFFFFFFF
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _nibble_shifts(order: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Bit offset of column c's nibble inside its int32, for c = 0..7."""
    return 4 * torch.tensor([order.index(c) for c in range(8)], dtype=dtype, device=device)


def pack_nibbles(values: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """[R, C] ints in 0..15 -> int32 [R, C/8], nibble i of word j holding column 8j + order[i]."""
    r, c = values.shape
    if c % 8:
        raise ValueError(f"cannot pack {c} columns: not a multiple of 8")
    v = values.to(torch.int64).reshape(r, c // 8, 8)
    return _to_int32((v << _nibble_shifts(order, torch.int64, values.device)).sum(-1))  # disjoint nibbles: sum = OR


def unpack_nibbles(packed: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_nibbles`: int32 [R, C/8] -> int32 values 0..15 [R, C]."""
    v = (packed[:, :, None] >> _nibble_shifts(order, torch.int32, packed.device)) & 0xF
    return v.reshape(packed.shape[0], -1)


def column_chunks(k: int, n: int) -> list[tuple[int, int]]:
    """[start, end) ranges of output columns, multiples of 64 wide, ~REPACK_CHUNK_WEIGHTS weights each.

    64: torch's CPU int4 converter packs blocks of 64 output rows, so chunks must not split one.
    """
    step = max(64, REPACK_CHUNK_WEIGHTS // max(k, 1) // 64 * 64)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


# ---------------------------------------------------------------- AutoAWQ GEMM

def pack_gemm(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """Integer weights q [K, N], zeros [K/G, N] and scales [K/G, N] -> the GEMM tensors."""
    return {"qweight": pack_nibbles(q, AWQ_ORDER), "qzeros": pack_nibbles(zeros, AWQ_ORDER),
            "scales": scales.to(torch.float16).contiguous()}


def dequantize_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """GEMM tensors -> the weight as a [K, N] matrix (x @ W), in the scales' dtype."""
    q = unpack_nibbles(qweight, AWQ_ORDER).to(scales.dtype)
    z = unpack_nibbles(qzeros, AWQ_ORDER).to(scales.dtype)
    g = torch.arange(q.shape[0], device=q.device) // group_size
    return (q - z[g]) * scales[g]


def _gemm_rows(qweight: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Output columns [a, b) of a GEMM qweight as int32 rows q^T [b - a, K]."""
    return unpack_nibbles(qweight[:, a // 8:b // 8], AWQ_ORDER).t().contiguous()


# ---------------------------------------------------------------- TinyChat (llm-awq v2)

TINYCHAT_INTERLEAVE = 4  # output rows interleaved per int16 word
TINYCHAT_KSTRIDE = 64    # input columns per interleaved block


def tinychat_scale_rows(in_features: int, group_size: int) -> int:
    """Rows of TinyChat's scales/scaled_zeros: K/G rounded up to 8 (and to 16/32 for G=64/32)."""
    mult = {128: 1, 64: 2, 32: 4}.get(group_size, 1)
    width = -(-(in_features // group_size) // 8)
    return (-(-width // mult) * mult) * 8


def _tinychat_permutation(k: int) -> torch.Tensor:
    """perm[p] = original column stored at position p inside each row (two fixed shuffles per 32)."""
    idx = torch.arange(k).reshape(k // 32, 4, 4, 2).permute(0, 2, 1, 3)  # 32-block shuffle
    idx = idx.reshape(k // 32, 4, 4, 2).permute(0, 1, 3, 2)              # 0,2,4,6,1,3,5,7 per 8
    return idx.reshape(k)


def unpack_tinychat_qweight(qweight: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """TinyChat int16 [N/4, K] -> int32 q [N, K] in 0..15 (row n = output feature n)."""
    n, k = out_features, in_features
    il, ks = TINYCHAT_INTERLEAVE, TINYCHAT_KSTRIDE
    if tuple(qweight.shape) != (n // il, k) or k % ks or n % il:
        raise CheckpointError(f"TinyChat qweight of shape {tuple(qweight.shape)} does not fit a {n}x{k} layer")
    w = qweight.to(torch.int32) & 0xFFFF
    nib = torch.stack([(w >> (4 * i)) & 0xF for i in range(il)], dim=-1)  # [N/4, K, 4]
    # [N/4, K/64, 64, 4] read back as [N/4, K/64, 4 rows, 64 cols], then rows de-interleaved
    nib = nib.reshape(n // il, k // ks, il, ks).permute(0, 2, 1, 3).reshape(n, k)
    out = torch.empty_like(nib)
    out[:, _tinychat_permutation(k)] = nib
    return out


def tinychat_to_gemm(qweight: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor,
                     group_size: int) -> dict[str, torch.Tensor]:
    """One TinyChat layer -> the GEMM tensors (exact: the integers are kept, not re-quantized)."""
    n, k = scales.shape[1], qweight.shape[1]  # qweight is [N/4, K]: four int4 rows per int16
    q = unpack_tinychat_qweight(qweight, n, k)  # [N, K]
    groups = k // group_size
    s = scales[:groups].float()
    z = torch.round(-scaled_zeros[:groups].float() / torch.where(s == 0, torch.ones_like(s), s)).clamp(0, 15)
    return pack_gemm(q.t(), z.to(torch.int64), scales[:groups])


# ---------------------------------------------------------------- Triton (the W4A16 kernels' layout)

@dataclass
class TritonInt4Weight:
    qweight: torch.Tensor  # int32 [N, K/8], natural nibble order along K
    scales: torch.Tensor  # [N, K/G], the checkpoint's float dtype (fp16)
    zeros: torch.Tensor  # uint8 [N, K/G]
    in_features: int  # K
    out_features: int  # N
    group_size: int  # G

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))


def pack_triton(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> TritonInt4Weight:
    """The Triton layout straight from integer weights q [K, N], zeros and scales [K/G, N]."""
    k, n = q.shape
    return TritonInt4Weight(pack_nibbles(q.t().contiguous(), NATURAL_ORDER), scales.t().contiguous(),
                            zeros.t().contiguous().to(torch.uint8), k, n, group_size)


def gemm_to_triton(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   group_size: int) -> TritonInt4Weight:
    """GEMM tensors -> the Triton layout (same values), a block of output columns at a time
    (`column_chunks`) so the temporary memory stays small whatever the layer's size."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    packed = torch.empty((n, k // 8), dtype=torch.int32, device=qweight.device)
    for a, b in column_chunks(k, n):
        packed[a:b] = pack_nibbles(_gemm_rows(qweight, a, b), NATURAL_ORDER)
    z = unpack_nibbles(qzeros, AWQ_ORDER)  # [K/G, N]: 1/G of the weights, small
    return TritonInt4Weight(packed, scales.t().contiguous(), z.t().contiguous().to(torch.uint8), k, n, group_size)


def concat_outputs(parts: list[TritonInt4Weight]) -> TritonInt4Weight:
    """Stack several weights with the same K along N (e.g. gate and up into one matrix)."""
    k, g = parts[0].in_features, parts[0].group_size
    if any(p.in_features != k or p.group_size != g for p in parts):
        raise ValueError("only weights with the same in_features and group_size can be concatenated")
    return TritonInt4Weight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                            torch.cat([p.zeros for p in parts]), k, sum(p.out_features for p in parts), g)


# ---------------------------------------------------------------- CPU int4 (torch's converter input)

CPU_INT4_ROW_MULTIPLE = 16  # torch's CPU int4 kernel wants N % 16 == 0; AWQ guarantees only N % 8


def cpu_int4_rows(out_features: int) -> int:
    """N', the padded row count of the CPU int4 format."""
    return -(-out_features // CPU_INT4_ROW_MULTIPLE) * CPU_INT4_ROW_MULTIPLE


def cpu_int4_output(y: torch.Tensor, x: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """torch's int4 matmul result [rows, N'] -> the layer's output: padding columns dropped, in
    x's dtype, bias added, x's leading shape restored."""
    y = y[:, :out_features].to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], out_features)


def gemm_to_cpu_int4_weight(qweight: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """GEMM qweight -> the padded q [N', K], as (first row, int32 block) in `column_chunks`
    blocks so the caller can pack each before the next is unpacked; the last block carries the
    padding rows."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    n_pad = cpu_int4_rows(n)
    for a, b in column_chunks(k, n):
        q = _gemm_rows(qweight, a, b)
        if b == n and n_pad > n:
            q = torch.cat([q, q.new_zeros(n_pad - n, k)])
        yield a, q


def gemm_to_cpu_int4_scales_zeros(qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """GEMM qzeros and scales [K/G, N] -> float32 scales_zeros [K/G, N', 2] = (s, (8 - z) * s)."""
    n = scales.shape[1]
    z = unpack_nibbles(qzeros, AWQ_ORDER).float()
    s = scales.float()
    return torch.nn.functional.pad(torch.stack([s, (8 - z) * s], dim=-1), (0, 0, 0, cpu_int4_rows(n) - n))
