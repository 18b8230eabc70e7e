"""`CpuInt4Linear`: an AWQ `WQLinear` repacked for torch's int4 CPU matmul.

Why it is kept beside llama.cpp (the CPU default): it is the int4 path when llama-cpp-python is not
installed, when llama.cpp refuses a model, and under `--backend torch`, and there it is close to
llama.cpp rather than to the reference. Measured 2026-12-07 on the 2-core Xeon with AVX512-BF16 (load
~1, benchmarks/RESULTS.md "torch int4 on the CPU: kept"): decode of the VILA1.5-3B widths (2 layers)
41.3 tok/s against llama.cpp's 50.8 on the same int4 weights (0.81x) and 26.0 for fp32; one decode
GEMV 0.16 ms against 28.2 ms for `WQLinear`'s dequantize + matmul (q_proj, 2560 x 2560). Without BF16
instructions it takes fp32 activations and only inputs of a few rows (CPU_INT4_MAX_ROWS_FP32).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...formats.int4_formats import cpu_int4_output, cpu_int4_rows, gemm_to_cpu_int4_scales_zeros, gemm_to_cpu_int4_weight
from ...models.quant_linear import WQLinear
from .timing import cpu_int4_compute_dtype

CPU_INT4_MAX_ROWS_FP32 = 4  # with fp32 activations the int4 CPU matmul loses from ~8 rows on (RESULTS.md)


def cpu_int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def cpu_int4_fits(module: WQLinear) -> bool:
    """Whether torch's int4 CPU kernel takes this layer's group size (32-256; N is padded to 16)."""
    return module.group_size in (32, 64, 128, 256)


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
    w = (q - 8) * s + m with m = (8 - z) * s (int4_formats: the CPU int4 format), s and m
    rounded once to the compute dtype.
    """

    def __init__(self, awq: WQLinear, compute_dtype: torch.dtype | None = None):
        super().__init__()
        dtype = compute_dtype or cpu_int4_compute_dtype()
        self.in_features, self.out_features, self.group_size = awq.in_features, awq.out_features, awq.group_size
        packed = torch.empty((cpu_int4_rows(awq.out_features), awq.in_features // 2), dtype=torch.uint8)
        for a, q in gemm_to_cpu_int4_weight(awq.qweight):  # bounded temporaries, one chunk packed at a time
            packed[a:a + q.shape[0]] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.register_buffer("int4_packed", packed)
        self.register_buffer("int4_scales_zeros",
                             gemm_to_cpu_int4_scales_zeros(awq.qzeros, awq.scales).to(dtype).contiguous())
        self.register_buffer("bias", awq.bias)
        self.max_rows = None if dtype == torch.bfloat16 else CPU_INT4_MAX_ROWS_FP32
        self.reference = awq if self.max_rows is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.max_rows is not None and rows > self.max_rows:
            return self.reference(x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(rows, -1).to(self.int4_scales_zeros.dtype), self.int4_packed,
                                                      self.group_size, self.int4_scales_zeros)
        return cpu_int4_output(y, x, self.out_features, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"compute={str(self.int4_scales_zeros.dtype).replace('torch.', '')}")
