"""Drop-in modules for the fast paths: same forward(x) contract as the modules they replace.

- `TritonW4Linear`: an AWQ `WQLinear` repacked for the W4A16 kernels (CUDA; CPU via the interpreter).
- `TritonGatedMLP` / `TritonReluSqMLP`: the LLM's MLP with its epilogue fused into the GEMV.
- `TritonNorm`: RMSNorm / LayerNorm1P through the fused norm kernel.
- `CpuInt4Linear`: an AWQ linear repacked for torch's int4 CPU matmul, in the activation dtype
  measured fastest on this CPU (measured: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
import os
import time

import torch
import torch.nn as nn

from .int4_layout import Int4Weight, column_chunks, concat_outputs, repack_awq, unpack_awq

RMS, LAYERNORM1P = 0, 1


def is_awq_linear(module: nn.Module) -> bool:
    """An AutoAWQ-layout linear (our WQLinear or any module with its buffers)."""
    return type(module).__name__ == "WQLinear" or all(hasattr(module, a) for a in ("qweight", "qzeros", "scales"))


def int4_weight_of(module: nn.Module) -> Int4Weight:
    return repack_awq(module.qweight, module.qzeros, module.scales, module.group_size)


class TritonW4Linear(nn.Module):
    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = weight.in_features, weight.out_features, weight.group_size
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("wscales", weight.scales)
        self.register_buffer("wzeros", weight.zeros)
        self.register_buffer("bias", bias)

    @classmethod
    def from_awq(cls, module: nn.Module) -> "TritonW4Linear":
        return cls(int4_weight_of(module), module.bias)

    @property
    def weight4(self) -> Int4Weight:
        return Int4Weight(self.qweight, self.wscales, self.wzeros, self.in_features, self.out_features,
                          self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .w4a16 import w4a16_matmul

        return w4a16_matmul(x, self.weight4, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class TritonGatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up stacked in one int4 matrix (one GEMV at decode)."""

    def __init__(self, gate_up: Int4Weight, bias: torch.Tensor | None, down: nn.Module):
        super().__init__()
        self.gate_up = TritonW4Linear(gate_up, bias)
        self.down_proj = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .w4a16 import ACT_SILU_MUL, w4a16_matmul

        return self.down_proj(w4a16_matmul(x, self.gate_up.weight4, self.gate_up.bias, ACT_SILU_MUL))


class TritonReluSqMLP(nn.Module):
    """Nemotron's down(relu(up(x))^2) with the square fused into the up-projection's epilogue."""

    def __init__(self, up: TritonW4Linear, down: nn.Module):
        super().__init__()
        self.up_proj, self.down_proj = up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .w4a16 import ACT_RELU2, w4a16_matmul

        return self.down_proj(w4a16_matmul(x, self.up_proj.weight4, self.up_proj.bias, ACT_RELU2))


class TritonNorm(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps
        self.bias = getattr(norm, "bias", None)
        self.kind = norm_kind(norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .norms import add_norm

        return add_norm(x, None, self.weight, self.bias, self.eps, self.kind)[0]


def norm_kind(norm: nn.Module) -> int:
    kind = getattr(norm, "kind", None)
    if kind is not None:
        return kind
    return LAYERNORM1P if type(norm).__name__ == "LayerNorm1P" else RMS


def gated_mlp(mlp: nn.Module) -> TritonGatedMLP:
    gate, up = mlp.gate_proj, mlp.up_proj
    bias = torch.cat([gate.bias, up.bias]) if gate.bias is not None else None
    down = mlp.down_proj if not is_awq_linear(mlp.down_proj) else TritonW4Linear.from_awq(mlp.down_proj)
    return TritonGatedMLP(concat_outputs([int4_weight_of(gate), int4_weight_of(up)]), bias, down)


# ---- CPU -----------------------------------------------------------------------------------

CPU_INT4_MAX_ROWS_FP32 = 4  # with fp32 activations the int4 CPU matmul loses from ~8 rows on (RESULTS.md)


def cpu_int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def cpu_int4_fits(module: nn.Module) -> bool:
    """Whether torch's int4 CPU kernel takes this layer's group size (32-256; N is padded to 16)."""
    return module.group_size in (32, 64, 128, 256)


def _fastest(runs: dict) -> object:
    """The key of `runs` (key -> zero-argument callable) whose call took least, after a warm-up."""
    best, best_time = None, float("inf")
    for key, run in runs.items():
        run()  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            run()
        elapsed = time.perf_counter() - start
        if elapsed < best_time:
            best, best_time = key, elapsed
    return best


def _bf16_forced() -> bool | None:
    """EDGE_VLM_CPU_BF16=1 / 0 forces the CPU bf16 choices below on / off (reproducible runs, or
    a machine too busy to time fairly); unset, they are measured."""
    value = os.environ.get("EDGE_VLM_CPU_BF16", "").strip().lower()
    return None if not value else value not in ("0", "false", "no", "off")


@functools.cache
def cpu_int4_compute_dtype() -> torch.dtype:
    """The activation dtype torch's int4 CPU matmul runs fastest with on this CPU, timed once.

    With bfloat16 activations it uses the AVX512-BF16 / AMX paths where the CPU has them and
    measured ~30x faster than with float32 (RESULTS.md); on CPUs without them bfloat16 can be
    the slower one, hence a measurement (two ~1 MB matmuls, a few ms) rather than a guess.
    """
    if _bf16_forced() is not None:
        return torch.bfloat16 if _bf16_forced() else torch.float32
    k, n, group = 1024, 1024, 128
    gen = torch.Generator().manual_seed(0)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen), 1)
    x, sz = torch.randn(1, k, generator=gen), torch.rand(k // group, n, 2, generator=gen)
    return _fastest({dtype: functools.partial(torch.ops.aten._weight_int4pack_mm_for_cpu, x.to(dtype), packed, group,
                                              sz.to(dtype)) for dtype in (torch.float32, torch.bfloat16)})


@functools.cache
def cpu_bf16_matmul_is_faster() -> bool:
    """Whether dense bfloat16 matmuls beat float32 ones on this CPU (AVX512-BF16 / AMX), timed once.

    Decides whether the vision tower runs in bfloat16 on CPU: measured 2.4x faster on its
    shapes here (RESULTS.md); on CPUs without those instructions bfloat16 is emulated and slower.
    """
    if _bf16_forced() is not None:
        return _bf16_forced()
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=gen), torch.randn(512, 1024, generator=gen)
    return _fastest({dtype: functools.partial(torch.matmul, a.to(dtype), b.to(dtype))
                     for dtype in (torch.float32, torch.bfloat16)}) == torch.bfloat16


class CpuInt4Linear(nn.Module):
    """An AWQ linear repacked for torch's int4 CPU matmul (`_weight_int4pack_mm_for_cpu`).

    Activations are cast to `compute_dtype` (default: the one `cpu_int4_compute_dtype`
    measured fastest here), multiplied, and cast back. With bfloat16 the int4 matmul beats even
    dense fp32 at every prompt size measured (1-128 rows), so every input takes it and the AWQ
    buffers are dropped (the packed copy is the layer's only weight). With float32 only
    decode-sized inputs (<= CPU_INT4_MAX_ROWS_FP32 rows) do; larger ones go to the original
    module, kept as `reference`, whose dequantize+matmul wins there.
    bfloat16 activations add a rounding of 2^-9 relative per element, well inside the int4
    weights' own error (a step of 1/15 of each group's range). torch's kernel computes
    w = (q - 8) * s + m with m = (8 - z) * s: the AWQ dequantization (q - z) * s rewritten, s and
    m rounded once to the compute dtype.
    """

    def __init__(self, awq: nn.Module, compute_dtype: torch.dtype | None = None):
        super().__init__()
        dtype = compute_dtype or cpu_int4_compute_dtype()
        self.in_features, self.out_features, self.group_size = awq.in_features, awq.out_features, awq.group_size
        k, n = awq.in_features, awq.out_features
        n_pad = -(-n // 16) * 16  # the kernel wants N % 16 == 0; AWQ guarantees only N % 8
        packed = torch.empty((n_pad, k // 2), dtype=torch.uint8)
        for a, b in column_chunks(k, n):  # bounded temporaries; torch packs in blocks of 64 rows of N
            q = unpack_awq(awq.qweight[:, a // 8:b // 8]).t()  # [b - a, K]
            if b == n and n_pad > n:  # the last chunk carries the padding rows (their scales are 0)
                q = torch.cat([q, q.new_zeros(n_pad - n, k)])
            packed[a:a + q.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        z = unpack_awq(awq.qzeros)[:, :n].float()
        s = awq.scales.float()
        sz = torch.nn.functional.pad(torch.stack([s, (8 - z) * s], dim=-1), (0, 0, 0, n_pad - n))  # zero weights
        self.register_buffer("int4_packed", packed)
        self.register_buffer("int4_scales_zeros", sz.to(dtype).contiguous())
        self.register_buffer("bias", awq.bias)
        self.max_rows = None if dtype == torch.bfloat16 else CPU_INT4_MAX_ROWS_FP32
        self.reference = awq if self.max_rows is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.max_rows is not None and rows > self.max_rows:
            return self.reference(x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(rows, -1).to(self.int4_scales_zeros.dtype), self.int4_packed,
                                                      self.group_size, self.int4_scales_zeros)
        y = y[:, :self.out_features].to(x.dtype)  # drops the padding columns, if any
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"compute={str(self.int4_scales_zeros.dtype).replace('torch.', '')}")
