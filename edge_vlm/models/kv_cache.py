"""Static (preallocated) key/value cache, 16/32-bit or int8.

Sized once for `max_context` tokens, so decoding allocates nothing per token and the same
buffers serve every turn of a chat (and can be captured in a CUDA graph).

`quantized=True` stores each cached key and value vector (one token, one kv head) as int8 with
one float32 scale (`int8_rows.quantize_int8_rows`: symmetric, scale = max|x| / 127, rounded
half away from zero, the rule the Triton write kernel uses too). That halves the cache of a
fp16 model (D + 4 bytes per vector instead of 2 D) at an error of at most half a step,
max|x| / 254, per element.
"""

from __future__ import annotations

import torch

from ..formats.int8_rows import dequantize_int8_rows, quantize_int8_rows


KV_CACHE_KINDS = ("model", "int8")  # the cache in the model's dtype, or int8 rows (half of fp16)


class StaticKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, max_context: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, batch: int = 1, quantized: bool = False):
        shape = (num_layers, batch, num_kv_heads, max_context, head_dim)
        self.quantized = quantized
        self.k = torch.zeros(shape, dtype=torch.int8 if quantized else dtype, device=device)
        self.v = torch.zeros_like(self.k)
        # one scale per cached vector (quantized caches only); [L, B, Hkv, S]
        self.k_scale = torch.ones(shape[:-1], dtype=torch.float32, device=device) if quantized else None
        self.v_scale = torch.ones_like(self.k_scale) if quantized else None
        self.max_context = max_context
        self._position = 0  # tokens currently valid; changed only by advance() and truncate()

    @property
    def position(self) -> int:
        """How many tokens the cache holds: where the next token goes."""
        return self._position

    def advance(self, n: int) -> None:
        """Count `n` more tokens as cached, once every layer has written them (the model does this)."""
        if self._position + n > self.max_context:
            raise ValueError(f"positions up to {self._position + n} exceed the cache size {self.max_context}")
        self._position += n

    def truncate(self, length: int) -> None:
        """Forget everything after `length` tokens (the buffers are reused, not cleared)."""
        self._position = max(0, min(self._position, length))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v ([B, Hkv, T, D]) at the next T positions; return the valid prefix incl. them
        (dequantized to k's dtype for a quantized cache: attention then sees what later steps will).
        The position moves only when the model calls advance() after its last layer."""
        start = self._position
        end = start + k.shape[2]
        if not self.quantized:
            self.k[layer, :, :, start:end] = k
            self.v[layer, :, :, start:end] = v
            return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        for data, scales, new in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            data[layer, :, :, start:end], scales[layer, :, :, start:end] = quantize_int8_rows(new)
        return (dequantize_int8_rows(self.k[layer, :, :, :end], self.k_scale[layer, :, :, :end], k.dtype),
                dequantize_int8_rows(self.v[layer, :, :, :end], self.v_scale[layer, :, :, :end], v.dtype))

    @property
    def nbytes(self) -> int:
        layers, batch, heads, context, head_dim = self.k.shape
        return batch * kv_cache_bytes(layers, heads, head_dim, context, self.k.element_size(), self.quantized)


def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, context: int, itemsize: int,
                   quantized: bool = False) -> int:
    """What a StaticKVCache of this shape holds, without building it (memory estimates)."""
    per_vector = head_dim + 4 if quantized else head_dim * itemsize
    return 2 * num_layers * num_kv_heads * context * per_vector
