"""S2 multi-scale image preparation for the VILA family: which tiles the vision tower sees, at which scales.

- **Dynamic S2** (NVILA; config `dynamic_s2`, `image_aspect_ratio: dynamic_s2`): the only image of a
  message is resized (PIL bicubic) to a square canvas per scale but the last (`scale // scales[0]`
  tiles a side) and, at the last scale, to the grid of tiles whose cols/rows best matches the image's
  aspect ratio, with at least `(scales[-1] // scales[0])**2` and at most `max_tiles` tiles. Each canvas
  is cut into `scales[0]`-pixel tiles row by row. With several images in a message (or without the
  dynamic_s2 aspect) every image is one tile, squashed by the image processor: VILA has no tiling then.
- **Fixed S2** (VILA1.5-*-s2; config `s2`): the image is prepared at `scales[-1]` pixels as usual and
  the multi-scale split happens on its normalised pixels (`s2_features.fixed_s2_features`); here only
  the geometry (tiles and feature-map sides per scale), for token counts.

The grid choice follows VILA's `dynamic_s2_preprocess` (InternVL's rule): candidate grids in the order
VILA builds them (a Python set of (cols, rows), stably sorted by tile count), the one with the closest
cols/rows wins; on an exact tie the later one wins while the image's area exceeds half the grid's area.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable

from PIL import Image

from ..errors import UnsupportedModelError

MAX_TILES_LIMIT = 64  # bounds the candidate search (cubic in max_tiles) and the tower's work per image


@dataclass(frozen=True)
class S2Config:
    """A VILA checkpoint's S2 settings (`s2_scales`, `s2_max_split_size`, `s2_resize_output_to_scale_idx`,
    `max_tiles`), for either kind."""

    scales: tuple[int, ...]  # ascending, e.g. (448, 896, 1344)
    dynamic: bool  # dynamic S2 (NVILA) or fixed S2 (VILA1.5-*-s2)
    max_split_size: int | None = None  # fixed S2's tile side (the tower's input size)
    resize_output_to_scale_idx: int = 0  # whose feature map size the scales are resized to (Python index)
    max_tiles: int = 12  # dynamic S2: most tiles at the last scale
    tile_single_image: bool = True  # dynamic S2: image_aspect_ratio is dynamic_s2, so a lone image is tiled

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_vila(cls, top: dict) -> "S2Config | None":
        """From a VILA top config.json; None when the checkpoint uses no S2. Dynamic S2 wins over `s2` as in
        VILA's tower builder."""
        dynamic, fixed = bool(top.get("dynamic_s2")), bool(top.get("s2"))
        if not (dynamic or fixed):
            return None
        raw = top.get("s2_scales")
        try:
            scales = tuple(int(s) for s in (raw.split(",") if isinstance(raw, str) else raw))
        except (TypeError, ValueError):
            raise UnsupportedModelError(f"s2_scales {raw!r} is not a list of image sizes (e.g. \"448,896,1344\")")
        if not dynamic:
            scales = tuple(sorted(scales))  # VILA's fixed-S2 tower sorts them; its dynamic tiling does not
        aspect = top.get("image_aspect_ratio")
        if dynamic and aspect not in ("dynamic_s2", "resize", "pad", None):
            raise UnsupportedModelError(f"dynamic_s2 with image_aspect_ratio {aspect!r} is not supported; "
                                        "supported: dynamic_s2, resize, pad")
        split = top.get("s2_max_split_size")
        return cls(scales=scales, dynamic=dynamic, max_split_size=int(split) if split else None,
                   resize_output_to_scale_idx=int(top.get("s2_resize_output_to_scale_idx", 0) or 0),
                   max_tiles=int(top.get("max_tiles", 12) or 12), tile_single_image=aspect == "dynamic_s2")

    def validate(self) -> None:
        n = len(self.scales)
        if n == 0 or any(s <= 0 for s in self.scales) or list(self.scales) != sorted(set(self.scales)):
            raise UnsupportedModelError(f"s2_scales must be ascending positive sizes, not {list(self.scales)}")
        if not -n <= self.resize_output_to_scale_idx < n:
            raise UnsupportedModelError(f"s2_resize_output_to_scale_idx {self.resize_output_to_scale_idx} is not "
                                        f"an index into s2_scales {list(self.scales)}")
        if not self.dynamic and not (self.max_split_size and self.max_split_size > 0):
            raise UnsupportedModelError("fixed S2 needs a positive s2_max_split_size")
        if not 1 <= self.max_tiles <= MAX_TILES_LIMIT:
            raise ValueError(f"max tiles must be between 1 and {MAX_TILES_LIMIT}, not {self.max_tiles}")

    @property
    def tile_size(self) -> int:
        """Dynamic S2's tile side, the image processor's size there (`scales[0]`)."""
        return self.scales[0]

    @property
    def input_size(self) -> int:
        """Fixed S2's image processor size (`scales[-1]`): the image is prepared at the largest scale."""
        return self.scales[-1]

    def with_max_tiles(self, max_tiles: int) -> "S2Config":
        """The `--max-tiles` knob: fewer tiles at the last scale, fewer tokens (see `dynamic_s2_image_tokens`)."""
        return replace(self, max_tiles=max_tiles)


# ------------------------------------------------------------------ dynamic S2

@lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (cols, rows) with min..max tiles, in the order VILA tries them.

    VILA collects them in a Python set (filled by tile budget n = min..max, then cols, then rows, each
    1..n) and sorts it by tile count; the sort is stable, so within a count the set's iteration order
    stands. Filling a set in the same sequence gives the same iteration order. Empty when min > max.
    """
    grids: set[tuple[int, int]] = set()
    for budget in range(min_tiles, max_tiles + 1):
        for cols in range(1, budget + 1):
            for rows in range(1, budget + 1):
                if min_tiles <= cols * rows <= max_tiles:
                    grids.add((cols, rows))
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def closest_grid(width: int, height: int, candidates, tile_size: int) -> tuple[int, int]:
    """(cols, rows) among `candidates` for a width x height image; (1, 1) when there are none."""
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidates:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


@dataclass(frozen=True)
class DynamicS2Tiles:
    """How one image is tiled: square canvases for every scale but the last, then the aspect grid."""

    tile_size: int
    square_sides: tuple[int, ...]  # tiles per side of each scale's square canvas, scales[:-1]
    grid: tuple[int, int] | None  # (rows, cols) at the last scale (VILA's block_size); None: one squashed tile

    @property
    def canvases(self) -> list[tuple[int, int]]:
        """(rows, cols) of each canvas, in the tiles' order."""
        if self.grid is None:
            return [(1, 1)]
        return [(s, s) for s in self.square_sides] + [self.grid]

    @property
    def num_tiles(self) -> int:
        return sum(r * c for r, c in self.canvases)


def plan_dynamic_s2(width: int, height: int, cfg: S2Config, alone: bool = True) -> DynamicS2Tiles:
    """The tiling of a width x height image; `alone`: the only image of its message (VILA tiles only then)."""
    if width < 1 or height < 1:
        raise ValueError(f"an image needs a positive size, not {width}x{height}")
    s0 = cfg.tile_size
    if not (alone and cfg.tile_single_image):
        return DynamicS2Tiles(s0, (), None)
    sides = tuple(s // s0 for s in cfg.scales[:-1])
    cols, rows = closest_grid(width, height, candidate_grids((cfg.scales[-1] // s0) ** 2, cfg.max_tiles), s0)
    return DynamicS2Tiles(s0, sides, (rows, cols))


def cut_dynamic_s2(image: Image.Image, tiles: DynamicS2Tiles, resample: int = Image.BICUBIC) -> list[Image.Image]:
    """The tiles, canvas by canvas, each row by row, all `tile_size` square.

    The canvases are resized with PIL's default (bicubic), as VILA's dynamic_s2_preprocess does. An
    untiled image (grid None) is squashed to one tile with `resample`: pass the image processor's own.
    """
    s = tiles.tile_size
    image = image if image.mode == "RGB" else image.convert("RGB")
    if tiles.grid is None:
        return [image.resize((s, s), resample=resample)]
    out = []
    for rows, cols in tiles.canvases:
        canvas = image.resize((cols * s, rows * s), resample=Image.BICUBIC)
        out += [canvas.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
    return out


def projector_blocks(tiles: DynamicS2Tiles, cfg: S2Config) -> tuple[int, int]:
    """(rows, cols) of the blocks the merged feature map is cut into for the projector (VILA's new block
    size): the last scale's grid when features are resized to the last scale, else that scale's square."""
    if tiles.grid is None:
        return (1, 1)
    idx = cfg.resize_output_to_scale_idx
    if idx in (-1, len(cfg.scales) - 1):
        return tiles.grid
    side = cfg.scales[idx] // cfg.scales[0]
    return (side, side)


def dynamic_s2_image_tokens(width: int, height: int, cfg: S2Config, *, grid_side: int,
                            projector_tokens: Callable[[int], int], end_tokens: int, start_tokens: int = 0,
                            alone: bool = True) -> int:
    """LLM tokens for one image: every projector block is one tower grid (grid_side^2 patches) and gives
    `projector_tokens(grid_side**2)` tokens, then the image encoder's start/end token embeddings (VILA's
    BasicImageEncoder: none / the tokens of "\\n": the caller tokenizes)."""
    rows, cols = projector_blocks(plan_dynamic_s2(width, height, cfg, alone), cfg)
    return start_tokens + rows * cols * projector_tokens(grid_side * grid_side) + end_tokens


# ------------------------------------------------------------------ fixed S2

@dataclass(frozen=True)
class FixedS2Geometry:
    """Fixed S2 per scale: the image (at `input_size`) resized to scale, then to `splits` tiles a side of
    `max_split_size`; the tiles' features merged and area-resized to `feature_sides`; all scales resized
    to `output_side` and concatenated on channels."""

    input_size: int
    splits: tuple[int, ...]
    feature_sides: tuple[int, ...]
    output_side: int


def fixed_s2_geometry(cfg: S2Config, grid_side: int) -> FixedS2Geometry:
    """`grid_side`: the tower's patches per side at `max_split_size` pixels (SigLIP 384/14: 27)."""
    m = cfg.max_split_size
    splits = tuple(math.ceil(s / m) for s in cfg.scales)
    # the merged map (grid_side * k) covers k * m pixels of which the scale fills s: keep that share
    sides = tuple(math.ceil(s / (k * m) * (grid_side * k)) for s, k in zip(cfg.scales, splits))
    return FixedS2Geometry(cfg.input_size, splits, sides, sides[cfg.resize_output_to_scale_idx])


def fixed_s2_image_tokens(cfg: S2Config, *, grid_side: int, projector_tokens: Callable[[int], int],
                          end_tokens: int, start_tokens: int = 0) -> int:
    """LLM tokens for one image under fixed S2 (the same for every image)."""
    side = fixed_s2_geometry(cfg, grid_side).output_side
    return start_tokens + projector_tokens(side * side) + end_tokens
