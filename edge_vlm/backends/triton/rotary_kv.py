"""Rotary embedding (full or partial) fused with the KV-cache write.

One program per (token, head): it rotates the head's query, and for the first Hkv heads also
rotates the key and stores key and value straight into the static cache at position
start + t. The start position is read from a device tensor, so the same launch serves every
decode step of a CUDA graph. Rotation follows rotary.apply_rotary (rotate-half on the first R
features, the rest passed through); it is computed in fp32 and rounded once. With an int8
cache (QUANT) the rounded key and the value are then quantized as int8_rows.quantize_int8_rows
does: one scale max|x| / 127 per vector, rounded half away from zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launcher import kernel, next_power_of_2


@triton.jit  # a device function, called from kernels (the interpreter runs it through the launcher's patch)
def _store_int8(dst_ptr, scale_ptr, x, ok):
    """Store fp32 vector x as int8 with one scale (max|x| / 127), rounding half away from zero."""
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1.0e-8) / 127.0
    y = x / scale
    q = tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(-y + 0.5))
    tl.store(dst_ptr, tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8), mask=ok)
    tl.store(scale_ptr, scale)


@kernel
def _rotary_kv(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, qo_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr,
               H, HKV, R, stride_qt, stride_kt, stride_vt, stride_cos, stride_qot, stride_qoh,
               stride_ch, stride_cs, stride_sh, D: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr) + t
    d = tl.arange(0, BLOCK_D)
    ok = d < D
    half = R // 2
    rot = d < R
    partner = tl.where(d < half, d + half, d - half)
    sign = tl.where(d < half, -1.0, 1.0)
    c = tl.load(cos_ptr + pos * stride_cos + d, mask=rot, other=1.0)
    s = tl.load(sin_ptr + pos * stride_cos + d, mask=rot, other=0.0)
    # cos/sin are rounded to the activations' dtype first, as apply_rotary does
    c = c.to(q_ptr.dtype.element_ty).to(tl.float32)
    s = s.to(q_ptr.dtype.element_ty).to(tl.float32)
    q = tl.load(q_ptr + t * stride_qt + h * D + d, mask=ok, other=0.0).to(tl.float32)
    qp = tl.load(q_ptr + t * stride_qt + h * D + partner, mask=rot, other=0.0).to(tl.float32)
    tl.store(qo_ptr + t * stride_qot + h * stride_qoh + d, (q * c + sign * qp * s).to(qo_ptr.dtype.element_ty),
             mask=ok)
    if h < HKV:
        k = tl.load(k_ptr + t * stride_kt + h * D + d, mask=ok, other=0.0).to(tl.float32)
        kp = tl.load(k_ptr + t * stride_kt + h * D + partner, mask=rot, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + t * stride_vt + h * D + d, mask=ok, other=0.0)
        dst = h * stride_ch + pos * stride_cs + d
        k_rot = (k * c + sign * kp * s).to(q_ptr.dtype.element_ty)  # rounded as the reference path stores it
        if QUANT:
            _store_int8(kc_ptr + dst, ks_ptr + h * stride_sh + pos, k_rot.to(tl.float32), ok)
            _store_int8(vc_ptr + dst, vs_ptr + h * stride_sh + pos, v.to(tl.float32), ok)
        else:
            tl.store(kc_ptr + dst, k_rot.to(kc_ptr.dtype.element_ty), mask=ok)
            tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=ok)


def rotary_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    start: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int,
                    num_kv_heads: int, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H*D], k and v [T, Hkv*D] (rows of the projections, batch 1); cos/sin [S, R] fp32 tables;
    start: int tensor [1] (first position); k_cache/v_cache [Hkv, S, D] (one layer, batch 1), int8
    with k_scale/v_scale [Hkv, S] float32 for a quantized cache.
    Writes rotated k and v into the caches; returns the rotated q as [H, T, D]."""
    t = q.shape[0]
    d = k_cache.shape[-1]
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache and v_cache must share a layout with contiguous head_dim")
    quant = k_scale is not None
    if quant and (k_scale.stride(-1) != 1 or v_scale.stride() != k_scale.stride()):
        raise ValueError("k_scale and v_scale must share a layout with contiguous positions")
    q_out = torch.empty((num_heads, t, d), dtype=q.dtype, device=q.device)
    ks, vs = (k_scale, v_scale) if quant else (cos, cos)  # any pointer when unused
    _rotary_kv.on(q.device)[(t, num_heads)](q, k, v, cos, sin, start, q_out, k_cache, v_cache, ks, vs, num_heads,
                                            num_kv_heads, cos.shape[-1], q.stride(0), k.stride(0), v.stride(0),
                                            cos.stride(0), q_out.stride(1), q_out.stride(0), k_cache.stride(0),
                                            k_cache.stride(1), ks.stride(0), D=d, BLOCK_D=next_power_of_2(d),
                                            QUANT=quant)
    return q_out
