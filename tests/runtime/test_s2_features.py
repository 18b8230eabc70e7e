"""The S2 feature merge against a plain, loop-by-loop reading of VILA's encode_images (dynamic S2) and of
s2wrapper's forward (fixed S2): chessboards pasted tile by tile, PyTorch's area and bicubic resizes
written out from their definitions, blocks cut one by one. Tiny tensors (4x4 patches, 3 channels)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from edge_vlm.formats.configs import ProjectorConfig
from edge_vlm.formats.vila_encoders import S2Config
from edge_vlm.imaging.s2_tiling import (
    DynamicS2Tiles,
    dynamic_s2_image_tokens,
    fixed_s2_image_tokens,
    plan_dynamic_s2,
)
from edge_vlm.models.projector import Projector
from edge_vlm.models.s2_features import (
    assemble_projected,
    dynamic_s2_projector_input,
    encode_dynamic_s2,
    fixed_s2_features,
    merge_chessboard,
    split_chessboard,
)

from .test_s2_tiling import CONFIGS, random_sizes, reference_grid

G, C = 4, 3  # tower grid side and width in these tests


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of resizes of tiny maps: torch's thread pool costs milliseconds each on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ the reference, read plainly

def to_map(tokens):
    """[(h w), c] -> [c, h, w]: token r * side + c sits at row r, column c."""
    side = int(round(tokens.shape[0] ** 0.5))
    out = torch.zeros(tokens.shape[1], side, side, dtype=tokens.dtype)
    for r in range(side):
        for c in range(side):
            out[:, r, c] = tokens[r * side + c]
    return out


def to_tokens(fmap):
    """[c, h, w] -> [(h w), c], row by row."""
    return torch.stack([fmap[:, r, c] for r in range(fmap.shape[1]) for c in range(fmap.shape[2])])


def paste(tiles, rows, cols):
    """Tiles [c, h, w] in row-major order -> one [c, rows*h, cols*w] canvas."""
    c, h, w = tiles[0].shape
    canvas = torch.zeros(c, rows * h, cols * w, dtype=tiles[0].dtype)
    for i in range(rows):
        for j in range(cols):
            canvas[:, i * h:(i + 1) * h, j * w:(j + 1) * w] = tiles[i * cols + j]
    return canvas


def cut(canvas, rows, cols):
    h, w = canvas.shape[1] // rows, canvas.shape[2] // cols
    return [canvas[:, i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(rows) for j in range(cols)]


def area(fmap, size):
    """PyTorch's mode="area" (adaptive average pooling): output row i averages input rows
    floor(i*H/oh) .. ceil((i+1)*H/oh) - 1, the same for columns."""
    c, hh, ww = fmap.shape
    oh, ow = size
    out = torch.zeros(c, oh, ow, dtype=torch.float64)
    for i in range(oh):
        r0, r1 = (i * hh) // oh, -(-((i + 1) * hh) // oh)
        for j in range(ow):
            c0, c1 = (j * ww) // ow, -(-((j + 1) * ww) // ow)
            out[:, i, j] = fmap[:, r0:r1, c0:c1].double().mean(dim=(1, 2))
    return out.to(fmap.dtype)


def keys_weight(d, a=-0.75):
    """The bicubic convolution kernel PyTorch uses (Keys, a = -0.75) at distance d."""
    d = abs(d)
    if d <= 1:
        return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
    if d < 2:
        return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
    return 0.0


def bicubic_1d(x, out_len, axis):
    """Resize along one axis: half-pixel centres (align_corners=False), 4 taps, edge samples repeated."""
    n = x.shape[axis]
    pieces = []
    for o in range(out_len):
        src = (o + 0.5) * n / out_len - 0.5
        base = math.floor(src)
        acc = 0
        for tap in range(base - 1, base + 3):
            acc = acc + keys_weight(src - tap) * x.select(axis, min(max(tap, 0), n - 1)).double()
        pieces.append(acc)
    return torch.stack(pieces, dim=axis)


def bicubic(img, size):
    return bicubic_1d(bicubic_1d(img, size[0], 1), size[1], 2).to(img.dtype)


def reference_dynamic(features, block_sizes, scales, idx):
    """encode_images' projector input: per image, per scale its tiles pasted together, every map area-resized
    to scale idx's map, concatenated on channels (an untiled image: its features repeated per scale), then
    cut into blocks of the new block size."""
    blocks, grids, at = [], [], 0
    for block in block_sizes:
        if block is None:
            fmap = torch.cat([to_map(features[at])] * len(scales))
            grid, at = (1, 1), at + 1
        else:
            maps = []
            for scale in scales[:-1]:
                m = scale // scales[0]
                maps.append(paste([to_map(features[at + t]) for t in range(m * m)], m, m))
                at += m * m
            rows, cols = block
            maps.append(paste([to_map(features[at + t]) for t in range(rows * cols)], rows, cols))
            at += rows * cols
            size = tuple(maps[idx].shape[1:])
            fmap = torch.cat([area(m, size) for m in maps])
            grid = block if idx in (-1, len(scales) - 1) else (scales[idx] // scales[0],) * 2
        blocks += [to_tokens(b) for b in cut(fmap, *grid)]
        grids.append(grid)
    return blocks, grids


def reference_assemble(projected_blocks, grids):
    out, at = [], 0
    for rows, cols in grids:
        maps = [to_map(projected_blocks[at + t]) for t in range(rows * cols)]
        out.append(to_tokens(paste(maps, rows, cols)))
        at += rows * cols
    return out


def reference_fixed(tower, pixels, scales, max_split, idx):
    """s2wrapper.forward for one image [3, L, L]: per scale, bicubic to the scale, bicubic to a whole number
    of tiles, cut, tower, paste, area-resize to the scale's share; then area-resize all to scale idx's map."""
    maps = []
    for scale in scales:
        k = math.ceil(scale / max_split)
        x = bicubic(bicubic(pixels, (scale, scale)), (k * max_split, k * max_split))
        feats = tower(torch.stack(cut(x, k, k)))
        merged = paste([to_map(f) for f in feats], k, k)
        side = math.ceil(scale / (k * max_split) * merged.shape[-1])
        maps.append(area(merged, (side, side)))
    size = tuple(maps[idx].shape[1:])
    return to_tokens(torch.cat([area(m, size) for m in maps]))


class PatchTower:
    """A stand-in tower: patch p x p -> tanh(linear) features, G x G patches a tile, row-major. Any mix-up of
    tiles, rows or columns changes its output."""

    def __init__(self, tile: int, seed: int = 0):
        self.patch = tile // G
        self.weight = torch.randn(3 * self.patch ** 2, C, generator=torch.Generator().manual_seed(seed))

    def __call__(self, pixels):
        n, p = pixels.shape[0], self.patch
        x = pixels.reshape(n, 3, G, p, G, p).permute(0, 2, 4, 1, 3, 5).reshape(n, G * G, 3 * p * p)
        return torch.tanh(x @ self.weight + torch.linspace(-1, 1, G * G)[:, None])


def close(a, b, tol=1e-5):
    return a.shape == b.shape and (a.double() - b.double()).abs().max().item() <= tol


# ------------------------------------------------------------------ dynamic S2

def distinct_grids(scales, max_num):
    """The last-scale grids that hundreds of image sizes (tiny, extreme aspect) get: the merge depends on
    the grid alone."""
    grids = {reference_grid(w, h, scales, max_num, scales[0]) for w, h in random_sizes(400, seed=11)}
    return sorted((rows, cols) for cols, rows in grids)


@pytest.mark.parametrize("scales,max_num,idx", [(s, m, i) for s, m in CONFIGS for i in (-1, 0, 1)
                                                  if -len(s) <= i < len(s)])
def test_dynamic_merge_matches_the_reference(scales, max_num, idx):
    cfg = S2Config(scales=scales, dynamic=True, resize_output_to_scale_idx=idx, max_tiles=max_num)
    sides = tuple(s // scales[0] for s in scales[:-1])
    for grid in distinct_grids(scales, max_num):
        # two tiled images and an untiled one in one batch: offsets between images are exercised too
        images = [DynamicS2Tiles(scales[0], sides, grid), DynamicS2Tiles(scales[0], (), None),
                  DynamicS2Tiles(scales[0], sides, grid[::-1])]
        n = sum(t.num_tiles for t in images)
        # 2x2 patches a tile keep the loops quick; resizes between maps still have uneven ratios (6 -> 4)
        feats = torch.randn(n, 4, C, generator=torch.Generator().manual_seed(n))
        blocks, grids = dynamic_s2_projector_input(feats, images, cfg)
        want_blocks, want_grids = reference_dynamic(feats, [grid, None, grid[::-1]], scales, idx)
        assert grids == want_grids
        assert close(blocks, torch.stack(want_blocks)), (grid, idx)
        # after a projector that keeps the blocks' token maps (any per-block map works): the same tokens
        projected = blocks * 2 + 1
        for got, want in zip(assemble_projected(projected, grids), reference_assemble(list(projected), grids)):
            assert close(got, want)


@pytest.mark.parametrize("kind,idx", [("mlp_downsample_2x2_fix", -1), ("mlp_downsample_3x3_fix", -1),
                                      ("mlp_downsample_2x2_fix", 0), ("mlp_downsample_3x3_fix", 1)])
def test_encode_dynamic_s2_end_to_end(kind, idx):
    """Tiles -> tower -> merge -> projector -> reassembly, against the loop reference on the same tiles,
    with a real downsampling projector (its token map is smaller than the block: 2x2 and 3x3 merges)."""
    scales, tile = (8, 16, 24), 8
    cfg = S2Config(scales=scales, dynamic=True, resize_output_to_scale_idx=idx, max_tiles=12)
    tower = PatchTower(tile)
    torch.manual_seed(0)
    projector = Projector(ProjectorConfig(kind, C * len(scales), 5)).eval()
    rng = random.Random(1)
    for width, height in [(30, 20), (5, 70), (64, 64)] + [(rng.randint(1, 90), rng.randint(1, 90)) for _ in range(2)]:
        images = [plan_dynamic_s2(width, height, cfg), plan_dynamic_s2(height, width, cfg, alone=False)]
        pixels = torch.rand(sum(t.num_tiles for t in images), 3, tile, tile) * 2 - 1
        with torch.no_grad():
            got = encode_dynamic_s2(tower, projector, pixels, images, cfg, batch_size=5)
            blocks, grids = reference_dynamic(tower(pixels), [images[0].grid, None], scales, idx)
            want = reference_assemble([projector(b[None])[0] for b in blocks], grids)
        assert len(got) == 2 and all(close(g, w) for g, w in zip(got, want)), (width, height)
        assert got[0].shape[0] == len(blocks[:-1]) * projector.num_tokens(G * G)
        for image, (w, h, alone) in zip(got, [(width, height, True), (height, width, False)]):
            assert image.shape[0] == dynamic_s2_image_tokens(w, h, cfg, grid_side=G, end_tokens=0, alone=alone,
                                                             projector_tokens=projector.num_tokens)


def test_untiled_image_repeats_its_features_per_scale():
    cfg = S2Config(scales=(448, 896, 1344), dynamic=True, resize_output_to_scale_idx=-1)
    feats = torch.randn(1, G * G, C)
    blocks, grids = dynamic_s2_projector_input(feats, [DynamicS2Tiles(448, (), None)], cfg)
    assert grids == [(1, 1)] and blocks.shape == (1, G * G, 3 * C)
    assert torch.equal(blocks[0], feats[0].repeat(1, 3))  # channels: [C | C | C], not interleaved


def test_wrong_counts_are_refused():
    cfg = S2Config(scales=(448, 896, 1344), dynamic=True, resize_output_to_scale_idx=-1)
    images = [DynamicS2Tiles(448, (1, 2), (3, 3))]
    with pytest.raises(ValueError, match="14 needed|needing 14"):
        dynamic_s2_projector_input(torch.randn(13, G * G, C), images, cfg)
    with pytest.raises(ValueError, match="square grid"):
        dynamic_s2_projector_input(torch.randn(14, 15, C), images, cfg)
    with pytest.raises(ValueError, match="projected blocks"):
        assemble_projected(torch.randn(8, 4, 2), [(3, 3)])


def test_chessboard_round_trip():
    x = torch.randn(2, 3, 12, 20)
    pieces = split_chessboard(x, 3, 4)
    assert pieces.shape == (24, 3, 4, 5)
    assert torch.equal(pieces[(1 * 4 + 2) * 2 + 1], x[1, :, 4:8, 10:15])  # piece (row 1, col 2) of image 1
    assert torch.equal(merge_chessboard(pieces, 3, 4), x)


# ------------------------------------------------------------------ fixed S2

@pytest.mark.parametrize("scales,max_split,idx", [
    ((8, 16, 24), 8, 0),  # VILA1.5-s2's shape (1x, 2x, 3x the tower's size), tiny
    ((8, 16, 24), 8, -1),
    ((8, 12, 20), 8, 0),  # scales that are not multiples: resized up to whole tiles, shares kept
    ((8, 12, 20), 8, 1),
    ((8, 11, 21), 8, 0),  # odd scales: the scale's share of the merged map is fractional, rounded up
    ((8, 11, 21), 8, -1),
    ((6, 16), 8, -1),  # a scale below the tower's size
    ((16,), 8, 0),
])
def test_fixed_s2_matches_s2wrapper(scales, max_split, idx):
    cfg = S2Config(scales=scales, dynamic=False, max_split_size=max_split, resize_output_to_scale_idx=idx)
    tower = PatchTower(max_split, seed=2)
    pixels = torch.rand(2, 3, scales[-1], scales[-1], generator=torch.Generator().manual_seed(3)) * 2 - 1
    got = fixed_s2_features(tower, pixels, cfg, batch_size=3)
    for b in range(2):
        want = reference_fixed(tower, pixels[b], scales, max_split, idx)
        # float32 bicubic/area against float64 loops, values of order 1
        assert close(got[b], want, tol=1e-5), b
    assert got.shape[-1] == C * len(scales)
    projector = Projector(ProjectorConfig("mlp_downsample", C * len(scales), 4))
    assert projector(got).shape[1] == fixed_s2_image_tokens(cfg, grid_side=G, end_tokens=0,
                                                            projector_tokens=projector.num_tokens)


def test_fixed_s2_keeps_the_dtype():
    cfg = S2Config(scales=(8, 16), dynamic=False, max_split_size=8)
    tower = PatchTower(8)
    pixels = torch.rand(1, 3, 16, 16)
    half = fixed_s2_features(lambda x: tower(x.float()).to(x.dtype), pixels.to(torch.bfloat16), cfg)
    assert half.dtype == torch.bfloat16
    full = fixed_s2_features(tower, pixels, cfg)
    assert close(half.float(), full, tol=0.05)  # bf16: 8 bits of mantissa through two resizes and tanh
