"""Static (preallocated) key/value cache.

Sized once for `max_context` tokens, so decoding allocates nothing per token and the same
buffers serve every turn of a chat (and can be captured in a CUDA graph).
"""

from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, max_context: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, batch: int = 1):
        shape = (num_layers, batch, num_kv_heads, max_context, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_context = max_context
        self.length = 0  # tokens currently valid

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v ([B, Hkv, T, D]) at positions start..start+T-1; return the valid prefix incl. them."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def truncate(self, length: int) -> None:
        """Forget everything after `length` tokens (the buffers are reused, not cleared)."""
        self.length = min(self.length, length)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
