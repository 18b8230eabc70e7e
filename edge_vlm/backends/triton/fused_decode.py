"""One decode step with static shapes: what the CUDA graph captures.

Positions live in device tensors (`pos`: where the new token goes), so the same sequence of
kernels is valid at every step and can be recorded once and replayed. Per layer:
fused add+norm -> q/k/v projections -> rotary fused with the KV-cache write -> decode attention
over the valid cache prefix -> o_proj -> fused add+norm -> MLP. The residual stream is carried
as (x, residual) so each add happens inside the next norm kernel.

It runs wherever the kernels run: compiled on CUDA, through Triton's interpreter on CPU (that
is how tests compare it with DecoderLM.forward).
"""

from __future__ import annotations

import torch

from ...models.kv_cache import StaticKVCache
from .decode_attention import decode_attention
from .modules import norm_args
from .norms import add_norm
from .rotary_kv import rotary_kv_write


class FusedDecoder:
    def __init__(self, llm, cache: StaticKVCache):
        if cache.k.shape[1] != 1:
            raise ValueError("the fused decode step serves batch 1")
        self.llm, self.cache = llm, cache
        device = llm.device
        self.cos, self.sin = llm.rope(cache.max_context, device)
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.pos = torch.zeros((1,), dtype=torch.int32, device=device)

    def _norm(self, norm, x, residual):
        return add_norm(x, residual, *norm_args(norm))

    def forward(self) -> torch.Tensor:
        """Logits [1, vocab] (float32) for `self.token` placed at position `self.pos`."""
        llm, cfg = self.llm, self.llm.cfg
        x = llm.embed(self.token)[0]  # [1, D]
        length = self.pos + 1
        residual = None
        h_add = x
        for i, layer in enumerate(llm.layers):
            h, residual = self._norm(layer.input_layernorm, h_add, residual)
            attn = layer.self_attn
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
            kc, vc = self.cache.k[i, 0], self.cache.v[i, 0]
            ks, vs = (self.cache.k_scale[i, 0], self.cache.v_scale[i, 0]) if self.cache.quantized else (None, None)
            q = rotary_kv_write(q, k, v, self.cos, self.sin, self.pos, kc, vc, cfg.num_heads, cfg.num_kv_heads, ks, vs)
            o = decode_attention(q[:, 0], kc, vc, length, k_scale=ks, v_scale=vs)  # [H, D]
            a = attn.o_proj(o.reshape(1, -1))
            h, residual = self._norm(layer.post_attention_layernorm, a, residual)
            h_add = layer.mlp(h)
        h, _ = self._norm(llm.norm, h_add, residual)
        return llm.lm_head(h).float()
