"""The language-model decoder: Llama, Qwen2 and Nemotron in one small module.

The three differ only in details that the config switches on:
- norm: RMSNorm (Llama, Qwen2) or LayerNorm1P, i.e. LayerNorm with weight + 1 (Nemotron);
- MLP: gated SiLU `down(silu(gate(x)) * up(x))` or Nemotron's `down(relu(up(x))**2)`;
- q/k/v bias (Qwen2) and partial rotary embedding (Nemotron rotates half of each head).
Parameter names follow the Hugging Face checkpoints (minus the leading "model."), so
weights load by name and quantized layers can be swapped in by name.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..formats.configs import LLMConfig
from .kv_cache import StaticKVCache
from .rotary import apply_rotary, rope_tables


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LayerNorm1P(nn.Module):
    """Nemotron's LayerNorm: the stored weight is a delta from 1 (zero-centred gamma)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight + 1.0, self.bias, self.eps)


def make_norm(cfg: LLMConfig) -> nn.Module:
    return LayerNorm1P(cfg.hidden_size, cfg.norm_eps) if cfg.norm == "layernorm1p" else RMSNorm(cfg.hidden_size, cfg.norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, d, bias=False)

    def forward(self, x, cos, sin, cache: StaticKVCache, layer: int, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = cache.write(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gated = cfg.mlp == "gated_silu"
        if self.gated:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.relu(self.up_proj(x)).square())


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, layer, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLM(nn.Module):
    """A causal LM that reads/writes a static KV cache.

    `forward(embeds, cache)` runs the T new tokens at the cache's next positions, advances the
    cache past them, and returns logits for the last position (decode, prefill) or for all
    positions (perplexity). The cache owns the position; nobody passes it in.
    """

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device  # the final norm is never quantized

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def tie_weights(self) -> None:
        """Share the embedding with lm_head, when both are still plain 16-bit modules."""
        if self.cfg.tie_word_embeddings and isinstance(self.lm_head, nn.Linear) \
                and isinstance(self.embed_tokens, nn.Embedding):
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self, max_context: int, dtype: torch.dtype | None = None,
                  quantized: bool = False) -> StaticKVCache:
        """A KV cache for `max_context` positions; `quantized`: int8 K/V with one scale per row."""
        return StaticKVCache(self.cfg.num_layers, self.cfg.num_kv_heads, max_context, self.cfg.head_dim,
                             dtype or self.dtype, self.device, quantized=quantized)

    def rope(self, max_positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].shape[0] < max_positions or self._rope[0].device != torch.device(device):
            self._rope = rope_tables(self.cfg, max_positions, device)
        return self._rope

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def forward(self, embeds: torch.Tensor, cache: StaticKVCache, all_logits: bool = False) -> torch.Tensor:
        t = embeds.shape[1]
        start = cache.position
        end = start + t
        if end > cache.max_context:
            raise ValueError(f"positions up to {end} exceed the cache size {cache.max_context}")
        cos, sin = self.rope(cache.max_context, embeds.device)
        cos, sin = cos[start:end], sin[start:end]
        mask = None
        if t > 1:  # causal within the new tokens, full view of the cached prefix
            q_pos = torch.arange(start, end, device=embeds.device)[:, None]
            mask = torch.arange(end, device=embeds.device)[None, :] <= q_pos
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, mask)
        cache.advance(t)
        x = self.norm(x if all_logits else x[:, -1:])
        return self.lm_head(x).float()
