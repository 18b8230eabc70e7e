"""W4A16 matrix multiply: fp16 activations x int4 weights (`TritonInt4Weight` layout), fp32 accumulation.

Two kernels, picked by the number of rows M of x:
- GEMV (decode, M <= 8): one program per (block of output rows, token). Each step loads a
  [BLOCK_N, BLOCK_W] tile of int32 words (BLOCK_W * 4 contiguous bytes per row), unpacks the 8
  nibbles in registers and uses s * (sum_j q_j x_j - z * sum_j x_j), so the zero point costs
  one multiply per word, not per weight. The weights are read once per token; with M <= 8 the
  re-reads for the other tokens are meant to come from L2 (by design; unmeasured on a GPU).
- GEMM (prefill): tiles of x and dequantized weights (rounded to x's dtype, like the reference
  dequantize-then-matmul) fed to `tl.dot`.
Epilogues (constexpr ACT): 0 none, 1 relu(y)^2 (Nemotron's MLP), 2 silu(gate) * up where the
weight stacks gate rows [0, N) over up rows [N, 2N) (Llama's gated MLP: one pass, one write).
"""

from __future__ import annotations

import torch
import triton.language as tl

from ...formats.int4_formats import TritonInt4Weight
from .launcher import kernel, next_power_of_2

ACT_NONE, ACT_RELU2, ACT_SILU_MUL = 0, 1, 2
GEMV_MAX_ROWS = 8


@kernel
def _w4a16_gemv(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, KW, G, stride_xm, stride_ym, stride_qn, stride_sn,
                HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    nib = tl.arange(0, 8)
    shifts = nib * 4
    kw = KW  # K / 8 words per row, passed whole: its divisibility lets the compiler vectorise the masked loads
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)  # the "up" half when ACT == 2
    for w0 in range(0, kw, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        w_ok = w < kw
        x = tl.load(x_ptr + m * stride_xm + w[:, None] * 8 + nib[None, :], mask=w_ok[:, None], other=0.0)
        x = x.to(tl.float32)  # [BLOCK_W, 8]
        xsum = tl.reduce(x, 1, tl.standard._sum_combine)  # [BLOCK_W]
        g = (w * 8) // G
        tile_ok = n_ok[:, None] & w_ok[None, :]
        packed = tl.load(qw_ptr + n[:, None] * stride_qn + w[None, :], mask=tile_ok, other=0)
        s = tl.load(s_ptr + n[:, None] * stride_sn + g[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + n[:, None] * stride_sn + g[None, :], mask=tile_ok, other=0).to(tl.float32)
        q = ((packed[:, :, None] >> shifts[None, None, :]) & 0xF).to(tl.float32)
        qx = tl.reduce(q * x[None, :, :], 2, tl.standard._sum_combine)  # [BLOCK_N, BLOCK_W]
        acc += tl.reduce(s * (qx - z * xsum[None, :]), 1, tl.standard._sum_combine)
        if ACT == 2:
            n2 = n + N
            packed = tl.load(qw_ptr + n2[:, None] * stride_qn + w[None, :], mask=tile_ok, other=0)
            s = tl.load(s_ptr + n2[:, None] * stride_sn + g[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + n2[:, None] * stride_sn + g[None, :], mask=tile_ok, other=0).to(tl.float32)
            q = ((packed[:, :, None] >> shifts[None, None, :]) & 0xF).to(tl.float32)
            qx = tl.reduce(q * x[None, :, :], 2, tl.standard._sum_combine)
            acc2 += tl.reduce(s * (qx - z * xsum[None, :]), 1, tl.standard._sum_combine)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        if ACT == 2:
            acc2 += tl.load(b_ptr + N + n, mask=n_ok, other=0.0).to(tl.float32)
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
        acc = acc * acc
    if ACT == 2:
        acc = acc / (1.0 + tl.exp(-acc)) * acc2
    tl.store(y_ptr + m * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


@kernel
def _w4a16_gemm(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, KW, G, stride_xm, stride_ym, stride_qn, stride_sn,
                HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    shifts = tl.arange(0, 8) * 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        w_ok = w < KW
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & (rk[None, :] < K), other=0.0)
        tile_ok = n_ok[:, None] & w_ok[None, :]
        g = (w * 8) // G
        packed = tl.load(qw_ptr + rn[:, None] * stride_qn + w[None, :], mask=tile_ok, other=0)
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn[:, None] * stride_sn + g[None, :], mask=tile_ok, other=0).to(tl.float32)
        q = ((packed[:, :, None] >> shifts[None, None, :]) & 0xF).to(tl.float32)
        wt = ((q - z[:, :, None]) * s[:, :, None]).to(x.dtype)  # [BLOCK_N, BLOCK_K/8, 8]
        wt = tl.trans(tl.reshape(wt, (BLOCK_N, BLOCK_K)))  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(x, wt, out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
        acc = acc * acc
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _gemv_blocks(n: int, k: int) -> tuple[int, int]:
    """(BLOCK_N rows, BLOCK_W words) per GEMV step.

    32 words = 128 contiguous bytes per row per step (eight 16-byte loads); the unpacked
    [BLOCK_N, BLOCK_W, 8] fp32 tile stays at <= 8192 values (64 registers/thread at 4 warps).
    16 rows per program below N = 8192 gives >= 160 programs for a 2560-wide layer, enough to
    cover an H100's 132 SMs. Not yet tuned on a GPU (see benchmarks/RESULTS.md).
    """
    block_n = 16 if n <= 8192 else 32
    return min(block_n, next_power_of_2(n)), min(32, next_power_of_2(k // 8))


def w4a16_matmul(x: torch.Tensor, w: TritonInt4Weight, bias: torch.Tensor | None = None, act: int = ACT_NONE,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """y = act(x @ dequantize(w) + bias), x [..., K] fp16 (or fp32 on CPU), y in x's dtype.

    With act=ACT_SILU_MUL, w stacks gate over up ([2N, K]) and y has N columns.
    """
    k = w.in_features
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {k}")
    n = w.out_features // 2 if act == ACT_SILU_MUL else w.out_features
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = out if out is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    b = bias if bias is not None else w.scales  # any pointer: unused when HAS_BIAS is False
    if m <= GEMV_MAX_ROWS:
        block_n, block_w = _gemv_blocks(n, k)
        grid = ((n + block_n - 1) // block_n, m)
        _w4a16_gemv.on(x.device)[grid](x2, w.qweight, w.scales, w.zeros, b, y, n, k // 8, w.group_size, x2.stride(0),
                                       y.stride(0), w.qweight.stride(0), w.scales.stride(0),
                                       HAS_BIAS=bias is not None, ACT=act, BLOCK_N=block_n, BLOCK_W=block_w)
    else:
        if act == ACT_SILU_MUL:  # prefill: one GEMM over gate+up, then the elementwise epilogue
            from .activations import silu_mul

            both = w4a16_matmul(x2, w, bias, ACT_NONE)
            return silu_mul(both[:, :n], both[:, n:]).reshape(*x.shape[:-1], n)
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        block_n = min(64, max(16, next_power_of_2(n)))
        block_k = min(32, max(16, next_power_of_2(k)))  # 64x64x32: 162 registers, no spills (aot_check)
        grid = ((m + block_m - 1) // block_m, (n + block_n - 1) // block_n)
        _w4a16_gemm.on(x.device)[grid](x2, w.qweight, w.scales, w.zeros, b, y, m, n, k, k // 8, w.group_size, x2.stride(0),
                                       y.stride(0), w.qweight.stride(0), w.scales.stride(0),
                                       HAS_BIAS=bias is not None, ACT=act, BLOCK_M=block_m, BLOCK_N=block_n,
                                       BLOCK_K=block_k)
    return y.reshape(*x.shape[:-1], n)
