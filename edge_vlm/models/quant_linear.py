"""`WQLinear`: a 4-bit weight-only linear layer in the AutoAWQ GEMM layout, in plain torch.

It is the reference every fast int4 kernel is tested against, and the CPU fallback. Its
state-dict names and shapes are exactly AutoAWQ's (`qweight`, `qzeros`, `scales`, `bias`),
so checkpoints load by name; the backends (edge_vlm/backends/) recognise it by type and swap it
for their own modules at load time.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..formats.configs import QuantConfig
from ..errors import UnsupportedModelError
from ..formats.int4_formats import dequantize_gemm
from ..formats.int8_rows import dequantize_int8_rows, quantize_int8_rows


class WQLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, group_size: int, w_bit: int = 4,
                 bias: bool = False, device=None, dtype: torch.dtype = torch.float16):
        super().__init__()
        if w_bit != 4:
            raise UnsupportedModelError(f"only 4-bit AWQ weights are supported, not {w_bit}-bit")
        if in_features % group_size or out_features % 8:
            raise UnsupportedModelError(
                f"a {in_features}->{out_features} layer cannot hold AWQ group-{group_size} weights "
                f"(in_features must be a multiple of the group size, out_features of 8)")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.w_bit = group_size, w_bit
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features, out_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_gemm(self.qweight, self.qzeros, self.scales, self.group_size).to(x.dtype)
        out = x @ w
        return out + self.bias.to(x.dtype) if self.bias is not None else out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, w_bit={self.w_bit}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class Int8Embedding(nn.Module):
    """Token embeddings as int8 with one scale per row (symmetric): w[v] ~= qweight[v] * scales[v].

    Big-vocabulary models carry a large 16-bit table (Nemotron-Mini-4B: 256k x 3072 = 1.57 GB)
    that is only ever gathered row by row, so int8 halves it at no speed cost: a lookup
    dequantizes just the rows it reads. Per-row error is at most max|row| / 254.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype: torch.dtype = torch.float16):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.zeros(num_embeddings, dtype=dtype, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_int8_rows(self.qweight[ids], self.scales[ids], self.scales.dtype)


def quantize_embedding_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[V, D] float -> (int8 [V, D], fp16 scales [V]): what `--quantize-embedding` stores."""
    return quantize_int8_rows(weight, torch.float16)


def prepare_quantized(llm: nn.Module, qcfg: QuantConfig) -> list[str]:
    """Swap the quantized nn.Linear modules of `llm` for WQLinear (before the weights load).

    Every linear inside the decoder layers is converted unless its name contains an entry of
    modules_to_not_convert; lm_head stays 16-bit (AutoAWQ never quantizes it) unless the config
    says `quantize_lm_head` (our extension, for large vocabularies); `quantize_embedding` (also
    ours) makes the token embeddings an Int8Embedding. Returns the names converted.
    """
    bits, group, skip = qcfg.bits, qcfg.group_size, qcfg.modules_to_not_convert
    ref = next(iter(llm.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float16
    converted = []
    head = qcfg.quantize_lm_head
    for name, module in list(llm.named_modules()):
        if not isinstance(module, nn.Linear) or (name == "lm_head" and not head) or any(s and s in name for s in skip):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = llm.get_submodule(parent_name) if parent_name else llm
        q = WQLinear(module.in_features, module.out_features, group, bits, module.bias is not None,
                     device=module.weight.device, dtype=dtype)
        setattr(parent, child, q)
        converted.append(name)
    if qcfg.quantize_embedding:  # our extension: int8 token embeddings
        emb = llm.embed_tokens
        llm.embed_tokens = Int8Embedding(emb.num_embeddings, emb.embedding_dim, emb.weight.device, dtype)
        converted.append("embed_tokens")
    return converted
