"""Vision towers: SigLIP and CLIP ViT encoders, run up to the layer the VLM reads.

Both are plain pre-norm ViTs; they differ in the embedding (CLIP has a class token, a
bias-free patch conv and a `pre_layrnorm`) and the activation. LLaVA-style VLMs read the
hidden state of the second-to-last layer, so the layers after it are never built or loaded.
Parameter names follow the Hugging Face checkpoints (minus "vision_model." and "encoder.").
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..formats.configs import VisionConfig

ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.has_cls = cfg.arch == "clip"
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size,
                                         bias=not self.has_cls)
        n = cfg.num_patches + (1 if self.has_cls else 0)
        self.position_embedding = nn.Embedding(n, cfg.hidden_size)
        if self.has_cls:
            self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        if self.has_cls:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight[None]


class SelfAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """pixels [N, 3, S, S] -> patch features [N, tokens, hidden] from the selected layer."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            from ..errors import UnsupportedModelError

            raise UnsupportedModelError(f"unsupported vision activation {cfg.hidden_act!r}")
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        if cfg.arch == "clip":
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers_used))

    @property
    def num_tokens(self) -> int:
        return self.cfg.num_patches + (1 if self.cfg.arch == "clip" else 0) - (1 if self.cfg.drop_cls else 0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        if self.cfg.arch == "clip":
            x = self.pre_layrnorm(x)
        for layer in self.layers:
            x = layer(x)
        return x[:, 1:] if self.cfg.drop_cls else x
