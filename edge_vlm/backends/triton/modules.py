"""Drop-in modules for the Triton backend (same forward(x) contract as the modules they replace),
and `convert`, which swaps them in, chosen by the type of what they replace.

- `TritonW4Linear`: a `WQLinear` repacked to the Triton layout for the W4A16 kernels.
- `TritonGatedMLP` / `TritonReluSqMLP`: the LLM's `MLP` with its epilogue fused into the GEMV.
- `TritonNorm`: `RMSNorm` / `LayerNorm1P` through the fused norm kernel.
`convert` swaps whichever of them passed the self-check (backends/gpu_path.py decides).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...formats.int4_formats import TritonInt4Weight, concat_outputs, gemm_to_triton
from ...models.llm import MLP, DecoderLayer, LayerNorm1P, RMSNorm
from ...models.quant_linear import WQLinear
from ..swap import swap_modules
from .norms import LAYERNORM1P, RMS, add_norm
from .w4a16 import ACT_RELU2, ACT_SILU_MUL, w4a16_matmul


def triton_weight_of(module: WQLinear) -> TritonInt4Weight:
    return gemm_to_triton(module.qweight, module.qzeros, module.scales, module.group_size)


class TritonW4Linear(nn.Module):
    def __init__(self, weight: TritonInt4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = weight.in_features, weight.out_features, weight.group_size
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("wscales", weight.scales)
        self.register_buffer("wzeros", weight.zeros)
        self.register_buffer("bias", bias)

    @classmethod
    def from_awq(cls, module: WQLinear) -> "TritonW4Linear":
        return cls(triton_weight_of(module), module.bias)

    @property
    def weight4(self) -> TritonInt4Weight:
        return TritonInt4Weight(self.qweight, self.wscales, self.wzeros, self.in_features, self.out_features,
                                self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w4a16_matmul(x, self.weight4, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class TritonGatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up stacked in one int4 matrix (one GEMV at decode)."""

    def __init__(self, gate_up: TritonInt4Weight, bias: torch.Tensor | None, down: nn.Module):
        super().__init__()
        self.gate_up = TritonW4Linear(gate_up, bias)
        self.down_proj = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(w4a16_matmul(x, self.gate_up.weight4, self.gate_up.bias, ACT_SILU_MUL))


class TritonReluSqMLP(nn.Module):
    """Nemotron's down(relu(up(x))^2) with the square fused into the up-projection's epilogue."""

    def __init__(self, up: TritonW4Linear, down: nn.Module):
        super().__init__()
        self.up_proj, self.down_proj = up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(w4a16_matmul(x, self.up_proj.weight4, self.up_proj.bias, ACT_RELU2))


class TritonNorm(nn.Module):
    def __init__(self, norm: RMSNorm | LayerNorm1P):
        super().__init__()
        self.weight, self.bias, self.eps, self.kind = norm_args(norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_norm(x, None, self.weight, self.bias, self.eps, self.kind)[0]


def norm_args(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float, int]:
    """(weight, bias, eps, kind) of a model norm or a TritonNorm: what `add_norm` takes after x, residual."""
    if isinstance(norm, TritonNorm):
        return norm.weight, norm.bias, norm.eps, norm.kind
    if isinstance(norm, LayerNorm1P):
        return norm.weight, norm.bias, norm.eps, LAYERNORM1P
    if isinstance(norm, RMSNorm):
        return norm.weight, None, norm.eps, RMS
    raise TypeError(f"no fused norm kernel for {type(norm).__name__}")


def _fast_linear(module: nn.Module) -> nn.Module:
    """A WQLinear as a TritonW4Linear; any other linear (e.g. kept 16-bit) as it is."""
    return TritonW4Linear.from_awq(module) if isinstance(module, WQLinear) else module


def gated_mlp(mlp: MLP) -> TritonGatedMLP:
    gate, up = mlp.gate_proj, mlp.up_proj
    bias = torch.cat([gate.bias, up.bias]) if gate.bias is not None else None
    return TritonGatedMLP(concat_outputs([triton_weight_of(gate), triton_weight_of(up)]), bias,
                          _fast_linear(mlp.down_proj))


def fused_mlp(mlp: MLP) -> nn.Module:
    """A quantized MLP with its epilogue fused into the W4A16 kernels (gated SiLU or relu^2)."""
    if mlp.gated:
        return gated_mlp(mlp)
    return TritonReluSqMLP(TritonW4Linear.from_awq(mlp.up_proj), _fast_linear(mlp.down_proj))


def fusable(mlp: nn.Module) -> bool:
    """Whether `mlp` is a quantized MLP that `fused_mlp` takes."""
    return isinstance(mlp, MLP) and isinstance(mlp.up_proj, WQLinear) and (
        not mlp.gated or isinstance(mlp.gate_proj, WQLinear))


def convert(llm: nn.Module, fuse_mlps: bool = True, norms: bool = True) -> dict[str, int]:
    """Swap `llm`'s quantized MLPs (fused epilogues, if `fuse_mlps`), remaining WQLinears and (if
    `norms`) norms for the Triton modules; returns the counts."""
    counts: dict[str, int] = {}
    if fuse_mlps:
        for layer in [m for m in llm.modules() if isinstance(m, DecoderLayer) and fusable(m.mlp)]:
            kind = "fused_gated_mlp" if layer.mlp.gated else "fused_relu2_mlp"
            layer.mlp = fused_mlp(layer.mlp)
            counts[kind] = counts.get(kind, 0) + 1
    counts.update(swap_modules(llm, lambda m: isinstance(m, WQLinear), TritonW4Linear.from_awq, "w4a16_linear"))
    if norms:
        counts.update(convert_norms(llm))
    return counts


def convert_norms(llm: nn.Module) -> dict[str, int]:
    """Swap `llm`'s RMSNorm / LayerNorm1P modules for the fused norm kernel."""
    return swap_modules(llm, lambda m: isinstance(m, (RMSNorm, LayerNorm1P)), TritonNorm, "fused_norm")
