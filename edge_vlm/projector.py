"""Projectors from vision features to LLM embeddings.

- `linear`: one Linear.
- `mlpNx_gelu`: Linear, then (GELU, Linear) N-1 times (LLaVA's `mlp2x_gelu`).
- `mlp_downsample` (VILA1.5): merge each 2x2 block of patches into one token by concatenating
  their features (27x27 patches are zero-padded to 28x28 -> 196 tokens), then
  LayerNorm -> Linear -> GELU -> Linear.
- `mlp1` (InternVL, NVLM-D): pixel shuffle, each 2x2 block of patches into one token (1024 patches of
  a 448 px tile -> 256 tokens, in InternVL's order), then LayerNorm -> Linear -> GELU -> Linear.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ProjectorConfig


def merge_2x2(x: torch.Tensor) -> torch.Tensor:
    """[N, H*W, C] -> [N, ceil(H/2)*ceil(W/2), 4C], VILA's token order.

    Odd sides are zero-padded. Output tokens run column-block-major (the outer loop is over
    pairs of columns), and each token concatenates (r, c), (r, c+1), (r+1, c), (r+1, c+1):
    this is the order VILA's trained projector expects.
    """
    n, t, c = x.shape
    side = int(round(t ** 0.5))
    x = x.view(n, side, side, c)
    pad = side % 2
    if pad:
        x = F.pad(x, (0, 0, 0, 1, 0, 1))  # pad width (dim 2) then height (dim 1)
    h = w = side + pad
    x = x.view(n, h // 2, 2, w // 2, 2, c)  # [n, row block, row in block, col block, col in block, c]
    x = x.permute(0, 3, 1, 2, 4, 5)  # column blocks outermost
    return x.reshape(n, (h // 2) * (w // 2), 4 * c)


def pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """[N, S*S, C] -> [N, (S/2)^2, 4C], InternVL's token order (its `pixel_shuffle`, ps_version v2).

    Tokens run row-block-major; each concatenates (r, c), (r, c+1), (r+1, c), (r+1, c+1).
    """
    n, t, c = x.shape
    side = int(round(t ** 0.5))
    if side * side != t or side % 2:
        raise ValueError(f"pixel shuffle needs an even square grid of patches, got {t}")
    x = x.view(n, side // 2, 2, side // 2, 2, c)  # [n, row block, row in block, col block, col in block, c]
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n, t // 4, 4 * c)


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.downsample = cfg.kind in ("mlp_downsample", "mlp1")
        self.merge = pixel_shuffle if cfg.kind == "mlp1" else merge_2x2
        in_dim = cfg.in_dim * 4 if self.downsample else cfg.in_dim
        if self.downsample:
            self.norm = nn.LayerNorm(in_dim)
        dims = [in_dim] + [cfg.out_dim] * cfg.depth
        if cfg.kind == "mlp1" and cfg.mid_dim:
            dims[1] = cfg.mid_dim
        self.linears = nn.ModuleList(nn.Linear(a, b, bias=cfg.bias) for a, b in zip(dims[:-1], dims[1:]))

    def num_tokens(self, vision_tokens: int) -> int:
        if not self.downsample:
            return vision_tokens
        side = int(round(vision_tokens ** 0.5))
        return (side // 2) ** 2 if self.cfg.kind == "mlp1" else ((side + 1) // 2) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            x = self.norm(self.merge(x))
        for i, linear in enumerate(self.linears):
            if i:
                x = F.gelu(x)
            x = linear(x)
        return x
