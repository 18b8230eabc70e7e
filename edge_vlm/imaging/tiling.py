"""Dynamic high-resolution tiling (InternVL, NVLM-D): an image becomes a grid of square tiles
whose shape best matches its aspect ratio, plus a global thumbnail.

The grid is chosen as the reference preprocessing chooses it (InternVL's `dynamic_preprocess`,
transformers' GotOcr2 image processor): among all cols x rows grids with min..max tiles, ordered
by tile count, the one whose cols/rows is closest to width/height; on a tie, the later (bigger)
grid wins while the image's area exceeds half of that grid's area. The image is resized (PIL
bicubic) to the grid and cut row by row; the thumbnail (the whole image at tile size) follows
when there is more than one tile. One tile is a valid maximum: the image squashed to one tile,
the cheapest setting (and what video frames get).
"""

from __future__ import annotations

from PIL import Image

from ..formats.configs import TilingConfig


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Every (cols, rows) with min..max tiles, by tile count (cols-major within a count)."""
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles]
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(width: int, height: int, cfg: TilingConfig) -> tuple[int, int]:
    """(cols, rows) of the tile grid for a width x height image."""
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(cfg.min_tiles, cfg.max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * cfg.tile_size * cfg.tile_size * cols * rows:
            best = (cols, rows)
    return best


def tile_count(width: int, height: int, cfg: TilingConfig) -> int:
    """How many tiles (thumbnail included) `split_tiles` makes of a width x height image."""
    if cfg.max_tiles <= 1:
        return 1
    cols, rows = choose_grid(width, height, cfg)
    n = cols * rows
    return n + 1 if cfg.thumbnail and n > 1 else n


def split_tiles(image: Image.Image, cfg: TilingConfig) -> list[Image.Image]:
    """The image's tiles, row by row, then the thumbnail (when there is more than one tile)."""
    s = cfg.tile_size
    if cfg.max_tiles <= 1:
        return [image.resize((s, s), resample=Image.BICUBIC)]
    cols, rows = choose_grid(*image.size, cfg)
    canvas = image.resize((cols * s, rows * s), resample=Image.BICUBIC)
    tiles = [canvas.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
    if cfg.thumbnail and len(tiles) > 1:
        tiles.append(image.resize((s, s), resample=Image.BICUBIC))
    return tiles
