"""Drop-in modules for the fast paths: same forward(x) contract as the modules they replace.

- `TritonW4Linear`: an AWQ `WQLinear` repacked for the W4A16 kernels (CUDA; CPU via the interpreter).
- `TritonGatedMLP` / `TritonReluSqMLP`: the LLM's MLP with its epilogue fused into the GEMV.
- `TritonNorm`: RMSNorm / LayerNorm1P through the fused norm kernel.
- `attach_cpu_int4`: torch's int4 CPU matmul for decode-sized inputs (few rows) added to an AWQ
  linear in place; the reference dequantize+matmul otherwise (measured: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn

from .int4_layout import Int4Weight, concat_outputs, dequantize, repack_awq, unpack_awq

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

CPU_INT4_MAX_ROWS = 4  # int4 CPU matmul wins at 1 row (~9x), loses from ~8 rows on (RESULTS.md)


def cpu_int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def attach_cpu_int4(module: nn.Module) -> nn.Module:
    """Give an AWQ linear on CPU torch's int4 matmul for <= CPU_INT4_MAX_ROWS rows (decode).

    The module keeps its class, buffers and state dict (code and checkpoints see a plain
    WQLinear); it gains a non-persistent int4-packed copy of its weight (K*N/2 bytes, plus
    fp32 scales/offsets) and a forward that routes decode-sized inputs to it. Larger inputs
    (prefill) take the module's own dequantize+matmul, which wins there on this CPU.
    torch's kernel computes w = (q - 8) * s + m with m = (8 - z) * s: the AWQ dequantization
    (q - z) * s rewritten, m rounded once to the compute dtype.
    """
    q = unpack_awq(module.qweight)  # [K, N]
    z = unpack_awq(module.qzeros)[:, :module.out_features].to(module.scales.dtype)
    s = module.scales
    module.register_buffer("int4_packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.t().contiguous(), 1),
                           persistent=False)
    module.register_buffer("int4_scales_zeros", torch.stack([s, (8 - z) * s], dim=-1).contiguous(), persistent=False)
    module.forward = types.MethodType(_cpu_int4_forward, module)
    return module


def _cpu_int4_forward(self, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows > CPU_INT4_MAX_ROWS or x.dtype != self.int4_scales_zeros.dtype:
        return type(self).forward(self, x)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(rows, -1).contiguous(), self.int4_packed,
                                                  self.group_size, self.int4_scales_zeros)
    if self.bias is not None:
        y = y + self.bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], self.out_features)


def has_cpu_int4(module: nn.Module) -> bool:
    return hasattr(module, "int4_packed")


def dense_weight(w: Int4Weight, dtype=torch.float16) -> torch.Tensor:
    """[K, N] dequantized (for baselines and tests)."""
    return dequantize(w, dtype)
