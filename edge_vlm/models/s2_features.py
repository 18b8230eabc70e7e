"""S2 multi-scale features: tower features of the tiles -> what VILA's encode_images feeds the projector.

- Dynamic S2 (NVILA): the tower runs on every tile of every image (one batch); per image, each scale's
  tiles are put back together into one feature map (`merge_chessboard`), every map is area-resized to
  the map of `resize_output_to_scale_idx` and the maps are concatenated on channels (C * scales wide).
  That map is cut into blocks of one tower grid each (`split_chessboard`), the projector runs on all
  blocks, and the blocks' tokens are put back into one row-major map per image (`assemble_projected`).
  An untiled image (several images in a message) is its one tile's features repeated once per scale.
- Fixed S2 (VILA1.5-*-s2, the s2wrapper package): per scale, the normalised pixels are resized
  (bicubic) to the scale, then to a whole number of `max_split_size` tiles, split, run through the
  tower, merged, area-resized back to the scale's share, then all scales area-resized to one map and
  concatenated on channels; the projector then runs as for any image.

Interpolations run in float32 and return to the features' dtype, as VILA's code does.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..imaging.s2_tiling import DynamicS2Tiles, S2Config, projector_blocks

Tower = Callable[[torch.Tensor], torch.Tensor]  # pixels [N, 3, S, S] -> features [N, P, C], P row-major patches


def tokens_to_map(x: torch.Tensor) -> torch.Tensor:
    """[N, h*w, C] (a square grid of tokens, row-major) -> [N, C, h, w]."""
    n, t, c = x.shape
    side = math.isqrt(t)
    if side * side != t:
        raise ValueError(f"expected a square grid of tokens, got {t}")
    return x.transpose(1, 2).reshape(n, c, side, side)


def merge_chessboard(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[rows*cols*b, C, h, w] -> [b, C, rows*h, cols*w]: piece t*b + i (t = r*cols + c) goes to row r, column c
    of the i-th output."""
    k = rows * cols
    if x.shape[0] % k:
        raise ValueError(f"{x.shape[0]} pieces do not fill a {rows}x{cols} board")
    _, c, h, w = x.shape
    b = x.shape[0] // k
    return x.reshape(rows, cols, b, c, h, w).permute(2, 3, 0, 4, 1, 5).reshape(b, c, rows * h, cols * w)


def split_chessboard(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[b, C, H, W] -> [rows*cols*b, C, H/rows, W/cols], the inverse of `merge_chessboard`."""
    b, c, hh, ww = x.shape
    if hh % rows or ww % cols:
        raise ValueError(f"a {hh}x{ww} map does not split into {rows}x{cols} pieces")
    h, w = hh // rows, ww // cols
    return x.reshape(b, c, rows, h, cols, w).permute(2, 4, 0, 1, 3, 5).reshape(rows * cols * b, c, h, w)


def area_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x.to(torch.float32), size=tuple(size), mode="area").to(x.dtype)


def bicubic_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x.to(torch.float32), size=tuple(size), mode="bicubic").to(x.dtype)


def run_tower(tower: Tower, pixels: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """The tower over all tiles, `batch_size` at a time (None: all at once)."""
    if not batch_size or pixels.shape[0] <= batch_size:
        return tower(pixels)
    return torch.cat([tower(chunk) for chunk in pixels.split(batch_size)])


# ------------------------------------------------------------------ dynamic S2

def dynamic_s2_projector_input(tile_features: torch.Tensor, images: Sequence[DynamicS2Tiles],
                               cfg: S2Config) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Tower features of all tiles of all images, in tile order -> (blocks [n_blocks, P, C * len(scales)],
    each image's (rows, cols) of blocks). Blocks run image by image, each row by row."""
    needed = sum(t.num_tiles for t in images)
    if tile_features.shape[0] != needed:
        raise ValueError(f"{tile_features.shape[0]} tiles of features for images needing {needed}")
    maps = tokens_to_map(tile_features)
    n_scales, idx = len(cfg.scales), cfg.resize_output_to_scale_idx
    blocks, grids, at = [], [], 0
    for tiles in images:
        own, at = maps[at:at + tiles.num_tiles], at + tiles.num_tiles
        if tiles.grid is None:
            merged = own.repeat(1, n_scales, 1, 1)
        else:
            per_scale, first = [], 0
            for rows, cols in tiles.canvases:
                per_scale.append(merge_chessboard(own[first:first + rows * cols], rows, cols))
                first += rows * cols
            size = per_scale[idx].shape[-2:]
            merged = torch.cat([area_resize(m, size) for m in per_scale], dim=1)
        rows, cols = projector_blocks(tiles, cfg)
        pieces = split_chessboard(merged, rows, cols)
        blocks.append(pieces.flatten(2).transpose(1, 2))
        grids.append((rows, cols))
    return torch.cat(blocks), grids


def assemble_projected(projected: torch.Tensor, grids: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Projector output per block [n_blocks, t*t, H] -> per image [rows*t * cols*t, H], its blocks' token maps
    put side by side and read row by row."""
    if projected.shape[0] != sum(r * c for r, c in grids):
        raise ValueError(f"{projected.shape[0]} projected blocks for grids {list(grids)}")
    side = math.isqrt(projected.shape[1])
    if side * side != projected.shape[1]:
        raise ValueError(f"expected a square grid of tokens per block, got {projected.shape[1]}")
    out, at = [], 0
    for rows, cols in grids:
        part = projected[at:at + rows * cols].reshape(rows, cols, side, side, -1)
        out.append(part.permute(0, 2, 1, 3, 4).reshape(rows * side * cols * side, -1))
        at += rows * cols
    return out


def encode_dynamic_s2(tower: Tower, projector: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                      images: Sequence[DynamicS2Tiles], cfg: S2Config,
                      batch_size: int | None = None) -> list[torch.Tensor]:
    """Each image's projected tokens [tokens, H] (before the image encoder's start/end tokens), from the
    normalised pixels of all tiles in tile order."""
    blocks, grids = dynamic_s2_projector_input(run_tower(tower, pixels, batch_size), images, cfg)
    return assemble_projected(projector(blocks), grids)


# ------------------------------------------------------------------ fixed S2

def fixed_s2_features(tower: Tower, pixels: torch.Tensor, cfg: S2Config,
                      batch_size: int | None = None) -> torch.Tensor:
    """Normalised pixels [B, 3, L, L] (L = scales[-1]) -> features [B, side*side, C * len(scales)] for the
    projector (s2wrapper's forward with square scales, split_mode resize, no prefix tokens)."""
    m = cfg.max_split_size
    maps = []
    for scale in cfg.scales:
        k = math.ceil(scale / m)
        x = bicubic_resize(bicubic_resize(pixels, (scale, scale)), (k * m, k * m))
        feats = run_tower(tower, split_chessboard(x, k, k), batch_size)
        merged = merge_chessboard(tokens_to_map(feats), k, k)
        side = math.ceil(scale / (k * m) * merged.shape[-1])
        maps.append(area_resize(merged, (side, side)))
    size = maps[cfg.resize_output_to_scale_idx].shape[-2:]
    out = torch.cat([area_resize(x, size) for x in maps], dim=1)
    return out.flatten(2).transpose(1, 2)
