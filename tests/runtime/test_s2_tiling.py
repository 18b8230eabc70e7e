"""S2 tiling against a plain reading of VILA's dynamic_s2_preprocess / s2wrapper arithmetic, over hundreds
of image sizes (tiny, extreme aspect ratios) and several scale sets."""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import pytest
from PIL import Image

from edge_vlm.errors import UnsupportedModelError
from edge_vlm.formats.vila_encoders import S2Config
from edge_vlm.imaging.s2_tiling import (
    candidate_grids,
    cut_dynamic_s2,
    dynamic_s2_image_tokens,
    fixed_s2_geometry,
    fixed_s2_image_tokens,
    plan_dynamic_s2,
    projector_blocks,
)

# ------------------------------------------------------------------ the reference, read plainly

@functools.lru_cache(maxsize=None)
def reference_ratios(min_num, max_num):
    """Candidates: a set comprehension over tile budgets, sorted by tile count (cached: the tests ask often)."""
    ratios = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
              if min_num <= i * j <= max_num}
    return sorted(ratios, key=lambda r: r[0] * r[1])


def reference_grid(width, height, scales, max_num, image_size):
    """VILA's choice for the last scale: (cols, rows). Walk the candidates keeping the closest aspect ratio,
    an exact tie going to the later one when the image's area is over half the candidate's."""
    ratios = reference_ratios((scales[-1] // scales[0]) ** 2, max_num)
    aspect = width / height
    best_diff, best = float("inf"), (1, 1)
    for r in ratios:
        d = abs(aspect - r[0] / r[1])
        if d < best_diff:
            best_diff, best = d, r
        elif d == best_diff and width * height > 0.5 * image_size * image_size * r[0] * r[1]:
            best = r
    return best


def reference_tiles(image, scales, max_num, image_size):
    """The tiles and block_size (rows, cols) as dynamic_s2_preprocess makes them."""
    out = []
    for scale in scales[:-1]:
        side = image_size * (scale // scales[0])
        canvas = image.resize((side, side))
        per_row = side // image_size
        for i in range((scale // scales[0]) ** 2):
            x, y = (i % per_row) * image_size, (i // per_row) * image_size
            out.append(canvas.crop((x, y, x + image_size, y + image_size)))
    cols, rows = reference_grid(*image.size, scales, max_num, image_size)
    canvas = image.resize((image_size * cols, image_size * rows))
    for i in range(cols * rows):
        x, y = (i % cols) * image_size, (i // cols) * image_size
        out.append(canvas.crop((x, y, x + image_size, y + image_size)))
    return out, (rows, cols)


def reference_tokens(block_size, scales, idx, grid_side, projector_side, end_tokens):
    """encode_images' count: the merged map takes the size of scale idx's map (the last scale's map is
    grid_side * block_size; scale i's is grid_side * (scale_i // scale_0) square), is cut into blocks of
    one tower grid each; each block gives projector_side^2 tokens; then the end tokens."""
    if block_size is None:
        return projector_side ** 2 + end_tokens
    maps = [(grid_side * (s // scales[0]),) * 2 for s in scales[:-1]]
    maps.append((grid_side * block_size[0], grid_side * block_size[1]))
    h, w = maps[idx]
    return (h // grid_side) * (w // grid_side) * projector_side ** 2 + end_tokens


def random_sizes(n, seed):
    rng = random.Random(seed)
    sizes = [(1, 1), (1, 2), (2, 1), (3, 7), (1, 4000), (4000, 1), (5, 3000), (3000, 5), (448, 448),
             (1344, 1344), (800, 600), (600, 800), (896, 448), (13, 13), (10000, 7), (7, 10000)]
    while len(sizes) < n:
        w = int(math.exp(rng.uniform(0, math.log(6000))))
        h = int(math.exp(rng.uniform(0, math.log(6000))))
        sizes.append((max(w, 1), max(h, 1)))
    return sizes


CONFIGS = [((448, 896, 1344), 12), ((384, 768, 1152), 12), ((448, 896), 12), ((448,), 12), ((448, 896, 1344), 6),
           ((448, 896, 1344), 9), ((448, 896, 1344), 1), ((448, 672, 1344), 12), ((448, 896, 1344), 24),
           ((448, 896, 1344, 1792), 12), ((448, 896, 1344, 1792), 20)]


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("scales,max_num", CONFIGS)
def test_grid_and_tile_count_match_the_reference(scales, max_num):
    cfg = S2Config(scales=scales, dynamic=True, resize_output_to_scale_idx=-1, max_tiles=max_num)
    for width, height in random_sizes(300, seed=hash((scales, max_num)) % 1000):
        cols, rows = reference_grid(width, height, scales, max_num, scales[0])
        tiles = plan_dynamic_s2(width, height, cfg)
        assert tiles.grid == (rows, cols), (width, height)
        assert tiles.num_tiles == sum((s // scales[0]) ** 2 for s in scales[:-1]) + rows * cols


@pytest.mark.parametrize("scales,max_num,idx", [(s, m, i) for s, m in CONFIGS for i in (-1, 0, 1, -2)
                                                  if -len(s) <= i < len(s)])
def test_token_counts_match_the_reference(scales, max_num, idx):
    cfg = S2Config(scales=scales, dynamic=True, resize_output_to_scale_idx=idx, max_tiles=max_num)
    for kind, grid_side, proj in [("2x2", 32, lambda t: ((math.isqrt(t) + 1) // 2) ** 2),
                                  ("3x3", 32, lambda t: ((math.isqrt(t) + 2) // 3) ** 2),
                                  ("2x2 odd", 27, lambda t: ((math.isqrt(t) + 1) // 2) ** 2)]:
        side = math.isqrt(proj(grid_side ** 2))
        for width, height in random_sizes(200, seed=7):
            cols, rows = reference_grid(width, height, scales, max_num, scales[0])
            want = reference_tokens((rows, cols), scales, idx, grid_side, side, end_tokens=1)
            got = dynamic_s2_image_tokens(width, height, cfg, grid_side=grid_side, projector_tokens=proj,
                                          end_tokens=1)
            assert got == want, (kind, width, height)
            # several images in a message: one squashed tile each, no tiling
            assert dynamic_s2_image_tokens(width, height, cfg, grid_side=grid_side, projector_tokens=proj,
                                           end_tokens=1, alone=False) == side * side + 1


def test_nvila_8b_numbers():
    """NVILA-8B: 448/896/1344, last-scale grid, 32x32 patches per tile, 2x2 merge: 256 tokens a block."""
    cfg = S2Config(scales=(448, 896, 1344), dynamic=True, resize_output_to_scale_idx=-1, max_tiles=12)
    proj = lambda t: ((math.isqrt(t) + 1) // 2) ** 2  # noqa: E731
    square, four_three, tall = plan_dynamic_s2(1000, 1000, cfg), plan_dynamic_s2(800, 600, cfg), \
        plan_dynamic_s2(10, 4000, cfg)
    assert square.grid == (3, 3) and square.num_tiles == 1 + 4 + 9
    assert four_three.grid == (3, 4) and four_three.num_tiles == 1 + 4 + 12
    assert tall.grid == (12, 1)
    assert dynamic_s2_image_tokens(1000, 1000, cfg, grid_side=32, projector_tokens=proj, end_tokens=1) == 9 * 256 + 1
    assert dynamic_s2_image_tokens(800, 600, cfg, grid_side=32, projector_tokens=proj, end_tokens=1) == 12 * 256 + 1
    # the --max-tiles knob below the last scale's minimum (9): one tile there, one block
    low = cfg.with_max_tiles(4)
    assert plan_dynamic_s2(800, 600, low).grid == (1, 1)
    assert dynamic_s2_image_tokens(800, 600, low, grid_side=32, projector_tokens=proj, end_tokens=1) == 257
    # resized to scale 0's map instead (LlavaConfig's default index): one block whatever the image
    first = S2Config(scales=(448, 896, 1344), dynamic=True, resize_output_to_scale_idx=0)
    assert projector_blocks(plan_dynamic_s2(800, 600, first), first) == (1, 1)


def test_tie_rule():
    """Equal aspect ratios (1x1, 2x2, 3x3 for a square image): the bigger grid wins while the image's area
    is over half of it."""
    cfg = S2Config(scales=(448,), dynamic=True, resize_output_to_scale_idx=-1, max_tiles=12)
    assert [plan_dynamic_s2(s, s, cfg).grid for s in (448, 634, 900, 951, 1344)] == \
        [(1, 1), (2, 2), (2, 2), (3, 3), (3, 3)]


def test_candidate_order_is_the_references():
    for lo, hi in [(1, 12), (4, 12), (9, 12), (9, 24), (16, 40), (13, 12)]:
        ref = sorted({(i, j) for n in range(lo, hi + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                      if lo <= i * j <= hi}, key=lambda r: r[0] * r[1])
        assert list(candidate_grids(lo, hi)) == ref


@pytest.mark.parametrize("scales,max_num", [((8, 16, 24), 12), ((8, 16), 6), ((6, 12, 18), 9), ((8,), 5)])
def test_pil_tiles_match_the_reference(scales, max_num):
    """Pixel for pixel, on tiny tiles (8 px) and images of many shapes."""
    cfg = S2Config(scales=scales, dynamic=True, resize_output_to_scale_idx=-1, max_tiles=max_num)
    rng = np.random.default_rng(0)
    for width, height in random_sizes(40, seed=3)[:40]:
        width, height = min(width, 300), min(height, 300)
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        want, block = reference_tiles(image, scales, max_num, scales[0])
        tiles = plan_dynamic_s2(width, height, cfg)
        got = cut_dynamic_s2(image, tiles)
        assert tiles.grid == block and len(got) == len(want) == tiles.num_tiles
        for a, b in zip(got, want):
            assert a.size == (scales[0], scales[0]) and np.array_equal(np.asarray(a), np.asarray(b))


def test_untiled_image_is_one_squashed_tile():
    cfg = S2Config(scales=(8, 16, 24), dynamic=True, resize_output_to_scale_idx=-1)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    tiles = plan_dynamic_s2(50, 30, cfg, alone=False)
    assert tiles.grid is None and tiles.num_tiles == 1
    (tile,) = cut_dynamic_s2(image, tiles, resample=Image.BILINEAR)
    assert np.array_equal(np.asarray(tile), np.asarray(image.resize((8, 8), Image.BILINEAR)))
    # a checkpoint whose aspect is not dynamic_s2 never tiles
    plain = S2Config(scales=(8, 16, 24), dynamic=True, tile_single_image=False)
    assert plan_dynamic_s2(50, 30, plain).grid is None


def test_rgba_and_grey_images_are_tiled_as_rgb():
    cfg = S2Config(scales=(8, 16), dynamic=True, resize_output_to_scale_idx=-1, max_tiles=4)
    grey = Image.fromarray(np.random.default_rng(2).integers(0, 256, (20, 40), dtype=np.uint8))
    got = cut_dynamic_s2(grey, plan_dynamic_s2(40, 20, cfg))
    want, _ = reference_tiles(grey.convert("RGB"), (8, 16), 4, 8)
    assert all(t.mode == "RGB" and np.array_equal(np.asarray(t), np.asarray(w)) for t, w in zip(got, want))


# ------------------------------------------------------------------ fixed S2

def reference_fixed_sides(scales, max_split, grid_side, idx):
    """s2wrapper.forward's sizes: split count, padded size, merged feature size, the 'original' feature size."""
    num_splits = [math.ceil(s / max_split) for s in scales]
    img_sizes = [k * max_split for k in num_splits]
    feature_sizes = [grid_side * k for k in num_splits]
    originals = [math.ceil(o / i * f) for o, i, f in zip(scales, img_sizes, feature_sizes)]
    return num_splits, originals, originals[idx]


def test_fixed_s2_geometry_matches_s2wrapper():
    rng = random.Random(5)
    cases = [((384, 768, 1152), 384, 27, 0), ((448, 896, 1344), 448, 32, 0), ((384, 768, 1152), 384, 27, -1),
             ((336, 672, 1008), 336, 24, 1)]
    for _ in range(300):
        m = rng.choice([224, 336, 384, 448])
        scales = tuple(sorted(rng.sample(range(32, 2000), rng.randint(1, 4))))
        cases.append((scales, m, rng.randint(1, 40), rng.randrange(-len(scales), len(scales))))
    for scales, m, g, idx in cases:
        cfg = S2Config(scales=scales, dynamic=False, max_split_size=m, resize_output_to_scale_idx=idx)
        splits, sides, out = reference_fixed_sides(scales, m, g, idx)
        geo = fixed_s2_geometry(cfg, g)
        assert (list(geo.splits), list(geo.feature_sides), geo.output_side) == (splits, sides, out)
        assert geo.input_size == scales[-1]
        proj = lambda t: ((math.isqrt(t) + 1) // 2) ** 2  # noqa: E731
        assert fixed_s2_image_tokens(cfg, grid_side=g, projector_tokens=proj, end_tokens=2) == proj(out * out) + 2


def test_vila15_s2_numbers():
    """VILA1.5-*-s2: SigLIP 384/14 (27 patches), scales 384/768/1152: maps 27, 54, 81 -> 27x27 -> 196 tokens."""
    cfg = S2Config.from_vila({"s2": True, "s2_scales": "384,768,1152", "s2_max_split_size": 384})
    geo = fixed_s2_geometry(cfg, 27)
    assert (geo.splits, geo.feature_sides, geo.output_side) == ((1, 2, 3), (27, 54, 81), 27)
    assert fixed_s2_image_tokens(cfg, grid_side=27, projector_tokens=lambda t: 196, end_tokens=0) == 196


# ------------------------------------------------------------------ config

def test_config_from_vila():
    nvila = {"dynamic_s2": True, "s2": False, "image_aspect_ratio": "dynamic_s2", "s2_scales": "448,896,1344",
             "s2_max_split_size": 448, "s2_resize_output_to_scale_idx": -1, "max_tiles": 12}
    cfg = S2Config.from_vila(nvila)
    assert (cfg.scales, cfg.dynamic, cfg.resize_output_to_scale_idx, cfg.max_tiles, cfg.tile_single_image) == \
        ((448, 896, 1344), True, -1, 12, True)
    assert S2Config.from_vila({**nvila, "s2_scales": [448, 896]}).scales == (448, 896)
    assert S2Config.from_vila({**nvila, "image_aspect_ratio": "resize"}).tile_single_image is False
    both = S2Config.from_vila({**nvila, "s2": True})
    assert both.dynamic  # VILA's builder checks dynamic_s2 first
    assert S2Config.from_vila({"image_aspect_ratio": "resize"}) is None
    fixed = S2Config.from_vila({"s2": True, "s2_scales": "1152,384,768", "s2_max_split_size": 384})
    assert fixed.scales == (384, 768, 1152) and not fixed.dynamic
    assert S2Config.from_vila({**nvila, "s2_resize_output_to_scale_idx": None}).resize_output_to_scale_idx == 0


@pytest.mark.parametrize("change,message", [
    ({"s2_scales": "896,448,1344"}, "ascending"),
    ({"s2_scales": "448,448"}, "ascending"),
    ({"s2_scales": "a,b"}, "not a list of image sizes"),
    ({"s2_scales": None}, "not a list of image sizes"),
    ({"s2_resize_output_to_scale_idx": 3}, "not an index"),
    ({"dynamic_s2": False, "s2": True, "s2_max_split_size": None}, "positive s2_max_split_size"),
    ({"image_aspect_ratio": "dynamic"}, "image_aspect_ratio 'dynamic'"),
])
def test_bad_configs_are_refused_clearly(change, message):
    nvila = {"dynamic_s2": True, "image_aspect_ratio": "dynamic_s2", "s2_scales": "448,896,1344",
             "s2_max_split_size": 448, "s2_resize_output_to_scale_idx": -1}
    with pytest.raises(UnsupportedModelError, match=message):
        S2Config.from_vila({**nvila, **change})


def test_bounds():
    cfg = S2Config(scales=(448, 896, 1344), dynamic=True)
    with pytest.raises(ValueError, match="max tiles"):
        cfg.with_max_tiles(0)
    with pytest.raises(ValueError, match="max tiles"):
        cfg.with_max_tiles(10 ** 6)  # the candidate search is cubic: refused before any work
    with pytest.raises(ValueError, match="positive size"):
        plan_dynamic_s2(0, 10, cfg)
