"""InternViT: the vision tower of InternVL 2.5/3 (300M) and NVLM-D (6B), run to the selected layer.

A pre-norm ViT with a class token and learned positions like CLIP, but each residual branch is
scaled by a learned per-channel vector (`ls1`, `ls2`) and the config switches the rest:
- 300M: LayerNorm, q/k/v with biases, no q/k normalisation;
- 6B: RMSNorm, q/k/v without biases, and RMSNorm of the whole query and key (all heads
  together, before they are split into heads).
The features the VLM reads are the patches of the selected layer, the class token dropped.
Parameter names follow InternVL's original checkpoints (minus "vision_model." and "encoder."),
except that q, k and v are separate Linears (the loader splits the fused `qkv`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..formats.configs import VisionConfig
from ..errors import UnsupportedModelError
from .llm import RMSNorm  # the decoder's: the same float32 normalisation




def _norm(cfg: VisionConfig) -> nn.Module:
    if cfg.norm == "rms_norm":
        return RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.patch_embedding = nn.Conv2d(3, d, cfg.patch_size, stride=cfg.patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.position_embedding = nn.Parameter(torch.zeros(cfg.num_patches + 1, d))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding[None]


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=cfg.qkv_bias) for _ in range(3))
        self.proj = nn.Linear(d, d)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(d, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.ls1 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.ls2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1 * self.attn(self.norm1(x))
        return x + self.ls2 * self.mlp(self.norm2(x))


class InternViT(nn.Module):
    """pixels [N, 3, S, S] -> patch features [N, (S/patch)^2, hidden] from the selected layer."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_act != "gelu" or cfg.norm not in ("layer_norm", "rms_norm"):
            raise UnsupportedModelError(f"unsupported InternViT variant (activation {cfg.hidden_act!r}, "
                                        f"norm {cfg.norm!r}); supported: gelu with layer_norm or rms_norm")
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers_used))

    @property
    def num_tokens(self) -> int:
        return self.cfg.num_patches

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for layer in self.layers:
            x = layer(x)
        return x[:, 1:]
