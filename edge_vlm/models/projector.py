"""Projectors from vision features to LLM embeddings.

- `linear`: one Linear.
- `mlpNx_gelu`: Linear, then (GELU, Linear) N-1 times (LLaVA's `mlp2x_gelu`).
- `mlp_downsample` (VILA1.5): merge each 2x2 block of patches into one token by concatenating
  their features (27x27 patches are zero-padded to 28x28 -> 196 tokens), then
  LayerNorm -> Linear -> GELU -> Linear.
- `mlp_downsample_2x2_fix` (NVILA; also NVILA's `mlp_downsample`, see `ProjectorConfig.from_vila`): the
  same layers, tokens in NVILA's order (row blocks outermost).
- `mlp_downsample_3x3_fix` (NVILA-Lite): each 3x3 block (sides zero-padded to a multiple of 3) into one
  token, then LayerNorm -> Linear(9m, 3m) -> GELU -> LayerNorm -> Linear(3m, H) -> GELU -> Linear(H, H).
  `mlp_downsample_3x3_s2` / `_s2_new`: the same merge, more Linears (widths in `ProjectorConfig.linear_dims`).
- `mlp1` (InternVL, NVLM-D): pixel shuffle, each 2x2 block of patches into one token (1024 patches of
  a 448 px tile -> 256 tokens, in InternVL's order), then LayerNorm -> Linear -> GELU -> Linear.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..formats.configs import ProjectorConfig


def merge_2x2(x: torch.Tensor) -> torch.Tensor:
    """[N, H*W, C] -> [N, ceil(H/2)*ceil(W/2), 4C], VILA1.5's token order.

    Odd sides are zero-padded. Output tokens run column-block-major (the outer loop is over
    pairs of columns), and each token concatenates (r, c), (r, c+1), (r+1, c), (r+1, c+1):
    this is the order of VILA's code when VILA1.5 was trained. NVILA's code (and its
    checkpoints) walk row blocks first: `merge_square`.
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


def merge_square(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N, S*S, C] -> [N, ceil(S/k)^2, k*k*C], NVILA's order (its `flat_square_2x2` / `flat_square_3x3`).

    The grid is zero-padded at the bottom and right to a multiple of k. Tokens run row-block-major;
    each concatenates its block's k*k patches row by row.
    """
    n, t, c = x.shape
    side = math.isqrt(t)
    if side * side != t:
        raise ValueError(f"a {k}x{k} merge needs a square grid of patches, got {t}")
    pad = -side % k
    grid = F.pad(x.reshape(n, side, side, c), (0, 0, 0, pad, 0, pad))
    b = (side + pad) // k
    grid = grid.view(n, b, k, b, k, c)  # [n, row block, row in block, col block, col in block, c]
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(n, b * b, k * k * c)


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


MERGES = {"2x2_columns": merge_2x2, "2x2_rows": partial(merge_square, k=2), "3x3_rows": partial(merge_square, k=3),
          "pixel_shuffle": pixel_shuffle}


class Projector(nn.Module):
    """merge (downsampling kinds) -> `norm` -> `linears[0]` -> GELU -> [`inner_norms[i-1]`] -> `linears[i]` ..."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.downsample = cfg.merge_factor > 1
        self.merge = MERGES.get(cfg.merge)
        in_dim = cfg.in_dim * cfg.merge_factor ** 2
        if self.downsample:
            self.norm = nn.LayerNorm(in_dim)
        dims = [in_dim] + cfg.linear_dims
        self.linears = nn.ModuleList(nn.Linear(a, b, bias=cfg.bias) for a, b in zip(dims[:-1], dims[1:]))
        # inner_norms[i] normalises the input of linears[i + 1], for every Linear but the first and the last
        self.inner_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims[1:-2]) if cfg.inner_norms else nn.ModuleList()

    def num_tokens(self, vision_tokens: int) -> int:
        if not self.downsample:
            return vision_tokens
        side = math.isqrt(vision_tokens)
        if self.cfg.merge == "pixel_shuffle":
            return (side // 2) ** 2
        return ((side + self.cfg.merge_factor - 1) // self.cfg.merge_factor) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            x = self.norm(self.merge(x))
        for i, linear in enumerate(self.linears):
            if i:
                x = F.gelu(x)
                if i - 1 < len(self.inner_norms):
                    x = self.inner_norms[i - 1](x)
            x = linear(x)
        return x


def vila_module_names(cfg: ProjectorConfig) -> dict[str, str]:
    """VILA's projector module names -> ours, for renaming checkpoint keys (`<vila name>.weight` / `.bias`).

    VILA's `MultimodalProjector.layers` is an `nn.Sequential` (a bare `nn.Linear` for `linear`):
    - mlpNx_gelu:              0 Linear, 1 GELU, 2 Linear, ...  -> layers.{2i} = linears.{i}
    - mlp_downsample, _2x2_fix: 0 merge, 1 LayerNorm, 2 Linear, 3 GELU, 4 Linear
                                -> layers.1 = norm, layers.2 = linears.0, layers.4 = linears.1
    - mlp_downsample_3x3_fix:  0 merge, 1 LN, 2 Linear, 3 GELU, 4 LN, 5 Linear, 6 GELU, 7 Linear
                                -> layers.1 = norm, .2 = linears.0, .4 = inner_norms.0, .5 = linears.1,
                                   .7 = linears.2
    - mlp_downsample_3x3_s2(_new): the same pattern, (GELU, LN, Linear) repeated, ending GELU, Linear.
    """
    if cfg.kind == "mlp1":
        raise ValueError("mlp1 is InternVL's projector, not VILA's")
    if cfg.kind == "linear":
        return {"layers": "linears.0"}
    if cfg.merge == "none":
        return {f"layers.{2 * i}": f"linears.{i}" for i in range(cfg.depth)}
    names, index = {"layers.1": "norm"}, 2
    for i in range(cfg.depth):
        if i:
            index += 1  # the GELU before linears[i]
            if cfg.inner_norms and i < cfg.depth - 1:
                names[f"layers.{index}"] = f"inner_norms.{i - 1}"
                index += 1
        names[f"layers.{index}"] = f"linears.{i}"
        index += 1
    return names
