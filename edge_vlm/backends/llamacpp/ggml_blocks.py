"""ggml's block formats built from the runtime's own integer formats, without re-quantizing.

- Q4_1 (block of 32 weights: fp16 `d`, fp16 `m`, 16 bytes of nibbles; w = q * d + m; weight j
  of the block in the low nibble of byte j, weight j + 16 in its high nibble) from AutoAWQ GEMM
  tensors: AWQ's w = (q - z) * s over groups of G = 32·n input channels is n Q4_1 blocks per
  group with the same q, d = s and m = -s·z. `d` is AWQ's fp16 scale, exact; only `m` is rounded
  to fp16, by at most half an fp16 ulp of |s·z|: with z <= 15, 15·2^-11 = 0.73% of one quantization
  step s at worst (measured on SmolLM2 g64: 0.58% worst, 0.09% mean).
- Q8_0 (block of 32: fp16 `d`, 32 int8; w = q * d) from our int8 embeddings (one fp16 scale
  per row): every block of a row gets the row's scale, exact.
- Q8_0 / F16 / F32 from float weights, through the `gguf` package's quantizer.

Everything works on rows = output features (ggml's row order) and returns uint8 byte rows.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGML_QUANT_SIZES
from gguf.quants import quantize as gguf_quantize

from edge_vlm.formats.int4_formats import AWQ_ORDER, column_chunks, unpack_nibbles

QK = 32  # weights per Q4_1 / Q8_0 block


def row_bytes(cols: int, qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return cols // block * size


def awq_to_q4_1(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                rows: torch.Tensor | None = None) -> np.ndarray:
    """GEMM tensors of a [K -> N] layer -> Q4_1 bytes [N, K/32 * 20] (output rows in `rows` order
    when given: a permutation of 0..N-1)."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    if group_size % QK or k % group_size:
        raise ValueError(f"AWQ group size {group_size} is not a multiple of {QK}")
    per_group = group_size // QK
    nb = k // QK
    z = unpack_nibbles(qzeros, AWQ_ORDER).t()  # [N, K/G]
    s = scales.t().to(torch.float16)  # [N, K/G]
    d = s.repeat_interleave(per_group, dim=1).contiguous()  # [N, nb]
    m = (-(s.float() * z.float())).to(torch.float16).repeat_interleave(per_group, dim=1).contiguous()
    qs = torch.empty((n, nb, QK // 2), dtype=torch.uint8)
    for a, b in column_chunks(k, n):  # unpack a block of output rows at a time (bounded memory)
        q = unpack_nibbles(qweight[:, a // 8:b // 8], AWQ_ORDER).t().reshape(b - a, nb, QK)
        qs[a:b] = (q[..., :QK // 2] | (q[..., QK // 2:] << 4)).to(torch.uint8)
    out = torch.cat([d.view(torch.uint8).reshape(n, nb, 2), m.view(torch.uint8).reshape(n, nb, 2), qs], dim=-1)
    out = out.reshape(n, nb * 20)
    if rows is not None:
        out = out[rows]
    return out.contiguous().numpy()


def int8_rows_to_q8_0(qweight: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor | None = None) -> np.ndarray:
    """int8 [V, D] with one fp16 scale per row -> Q8_0 bytes [V, D/32 * 34], the same values."""
    v, dim = qweight.shape
    if dim % QK:
        raise ValueError(f"rows of {dim} cannot be cut in Q8_0 blocks of {QK}")
    nb = dim // QK
    d = scales.to(torch.float16).reshape(v, 1).expand(v, nb).contiguous().view(torch.uint8).reshape(v, nb, 2)
    qs = qweight.to(torch.int8).reshape(v, nb, QK).view(torch.uint8)
    out = torch.cat([d, qs], dim=-1).reshape(v, nb * (QK + 2))
    if rows is not None:
        out = out[rows]
    return out.contiguous().numpy()


def encode_float(w: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """A float tensor in F32 / F16 (as that dtype) or a block type (as uint8 bytes per row)."""
    if qtype == GGMLQuantizationType.F32:
        return w.detach().float().contiguous().numpy()
    if qtype == GGMLQuantizationType.F16:
        return w.detach().to(torch.float16).contiguous().numpy()
    return gguf_quantize(w.detach().float().contiguous().numpy(), qtype)
