"""Attention of one new token over the static KV cache (flash-decoding).

The valid length is read from a device tensor, so a captured CUDA graph attends to exactly the
tokens written so far, not to the whole preallocated cache. The sequence is split across
SPLITS programs per head (a batch-1 decode has too few heads to fill a GPU); each keeps an
online softmax (running max m, sum l, weighted values) in fp32 and the partial results are
merged with one small torch reduction. An int8 cache (QUANT) is read as int8 and scaled by its
per-vector scales in registers: half the bytes of fp16.
"""

from __future__ import annotations

import math

import torch
import triton.language as tl

from .launcher import kernel, next_power_of_2

# "Minus infinity" is -1e30 (written as a literal in the kernel: compiled Triton kernels may not
# read non-constexpr globals): it keeps exp() and subtraction finite for empty splits.


@kernel
def _decode_attention(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, len_ptr, m_ptr, l_ptr, acc_ptr, GROUP, scale,
                      stride_qh, stride_kh, stride_ks, stride_sh, SPLITS: tl.constexpr, D: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, QUANT: tl.constexpr):
    h = tl.program_id(0)
    split = tl.program_id(1)
    kvh = h // GROUP
    length = tl.load(len_ptr)
    chunk = ((length + SPLITS - 1) // SPLITS + BLOCK_S - 1) // BLOCK_S * BLOCK_S
    lo = split * chunk
    hi = tl.minimum(lo + chunk, length)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + h * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32) * scale
    m = tl.full((), -1.0e30, tl.float32)
    l_sum = tl.full((), 0.0, tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for s0 in range(lo, hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < hi
        off = kvh * stride_kh + s[:, None] * stride_ks + d[None, :]
        kt = tl.load(k_ptr + off, mask=s_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if QUANT:
            kt = kt * tl.load(ks_ptr + kvh * stride_sh + s, mask=s_ok, other=0.0)[:, None]
        scores = tl.where(s_ok, tl.sum(kt * q[None, :], axis=1), -1.0e30)
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        p = tl.exp(scores - m_new)
        alpha = tl.exp(m - m_new)
        vt = tl.load(v_ptr + off, mask=s_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if QUANT:
            vt = vt * tl.load(vs_ptr + kvh * stride_sh + s, mask=s_ok, other=0.0)[:, None]
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        m = m_new
    i = h * SPLITS + split
    tl.store(m_ptr + i, m)
    tl.store(l_ptr + i, l_sum)
    tl.store(acc_ptr + i * D + d, acc, mask=d_ok)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                     splits: int = 8, block_s: int = 32, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over the first `length` cached positions.

    q [H, D] (one token, batch 1); k_cache/v_cache [Hkv, S, D] (int8 with k_scale/v_scale [Hkv, S]
    for a quantized cache); length: int tensor [1]. Returns [H, D] in q's dtype. Heads share kv
    heads in groups of H / Hkv (GQA).
    """
    h, d = q.shape
    hkv = k_cache.shape[0]
    m = torch.empty((h, splits), dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    acc = torch.empty((h, splits, d), dtype=torch.float32, device=q.device)
    quant = k_scale is not None
    ks, vs = (k_scale, v_scale) if quant else (m, m)  # any pointer when unused
    _decode_attention.on(q.device)[(h, splits)](q, k_cache, v_cache, ks, vs, length, m, l_sum, acc, h // hkv,
                                                1.0 / math.sqrt(d), q.stride(0), k_cache.stride(0),
                                                k_cache.stride(1), ks.stride(0), SPLITS=splits, D=d,
                                                BLOCK_D=next_power_of_2(d), BLOCK_S=block_s, QUANT=quant)
    weight = torch.exp(m - m.amax(dim=1, keepdim=True))  # [H, SPLITS]; empty splits get exp(-1e30) = 0
    out = (weight[..., None] * acc).sum(1) / (weight * l_sum).sum(1, keepdim=True)
    return out.to(q.dtype)
