"""jetson/memory_table.py's NVILA rows: every figure follows from the published shapes (benchmarks/shapes.py).

The expected bytes are written here from the formats themselves (AWQ's packed int4 with a scale and a
packed zero per 128 inputs, int8 rows with one fp16 scale each, the fp16 KV cache), not read back from
the modules the table sizes; the token counts from a plain reading of VILA's tiling rules.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from edge_vlm.benchmarks.shapes import LLM_SHAPES, NVILA_MAX_TILES, NVILA_VLMS

JETSON = Path(__file__).resolve().parents[2] / "jetson"
GROUP = 128  # AWQ_INT4's group size
FP16 = 2


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("memory_table", JETSON / "memory_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def awq_linear_bytes(k: int, n: int, bias: bool) -> int:
    """int4 weights (8 to an int32), a packed int4 zero and an fp16 scale per group of 128 inputs."""
    groups = k // GROUP
    return k * n // 2 + groups * n // 2 + groups * n * FP16 + (n * FP16 if bias else 0)


def int4_llm_bytes(s: dict, big_vocab: bool = False) -> int:
    """A Qwen2 decoder with AWQ linears: biased q/k/v, fp16 norms, fp16 embedding and lm_head (one table
    when tied); `big_vocab`: the lm_head int4 AWQ too and the embedding int8 rows with an fp16 scale each
    (two tables then, tied or not)."""
    d, f = s["hidden_size"], s["intermediate_size"]
    q, kv = s["num_heads"] * s["head_dim"], s["num_kv_heads"] * s["head_dim"]
    layer = (awq_linear_bytes(d, q, True) + 2 * awq_linear_bytes(d, kv, True) + awq_linear_bytes(q, d, False)
             + 2 * awq_linear_bytes(d, f, False) + awq_linear_bytes(f, d, False) + 2 * d * FP16)
    v = s["vocab_size"]
    if big_vocab:
        tables = v * d + v * FP16 + awq_linear_bytes(d, v, False)
    else:
        tables = v * d * FP16 * (1 if s.get("tie_word_embeddings") else 2)
    return s["num_layers"] * layer + tables + d * FP16


@pytest.mark.parametrize("name", list(NVILA_VLMS))
def test_nvila_llm_is_sized_as_int4_awq_of_its_shape(table, name):
    shape = LLM_SHAPES[NVILA_VLMS[name][0]]
    assert table.nvila_parts(name, 4096, False)["llm"] == int4_llm_bytes(shape)
    big = table.nvila_parts(name, 4096, True, table.AWQ_INT4_BIG_VOCAB)["llm"]
    assert big == int4_llm_bytes(shape, big_vocab=True)
    assert shape["vocab_size"] >= table.BIG_VOCAB  # why the table lists that row for NVILA


@pytest.mark.parametrize("name", list(NVILA_VLMS))
def test_nvila_kv_cache_is_fp16_keys_and_values_per_layer_and_kv_head(table, name):
    s = LLM_SHAPES[NVILA_VLMS[name][0]]
    for context in (1024, 4096):
        expected = 2 * s["num_layers"] * s["num_kv_heads"] * s["head_dim"] * FP16 * context
        assert table.nvila_parts(name, context, False)["kv_cache"] == expected


@pytest.mark.parametrize("name", list(NVILA_VLMS))
def test_nvila_tower_int8_keeps_one_byte_and_a_row_scale_per_linear_weight(table, name):
    tower = NVILA_VLMS[name][1]
    c, i = tower["hidden_size"], tower["intermediate_size"]
    layers = tower["num_layers"] - 1  # the feature is the second-last layer's: the last is never built
    # q, k, v, out (c x c), fc1 (c -> i), fc2 (i -> c): fp16 weight (2 bytes) -> int8 (1) + one fp16 scale a row
    saved = layers * (4 * (c * c - FP16 * c) + (c * i - FP16 * i) + (i * c - FP16 * c))
    fp16, int8 = (table.nvila_parts(name, 4096, q)["vision"] for q in (False, True))
    assert fp16 - int8 == saved
    assert 0.7e9 < fp16 < 0.9e9  # SigLIP-so400m: ~0.4 B parameters


@pytest.mark.parametrize("name", list(NVILA_VLMS))
def test_nvila_projector_widths_follow_the_s2_scales_and_the_merge(table, name):
    llm_shape, tower, kind, scales = NVILA_VLMS[name]
    m, h = tower["hidden_size"] * (len(scales) if scales else 1), LLM_SHAPES[llm_shape]["hidden_size"]
    linear = lambda a, b: (a * b + b) * FP16  # noqa: E731
    norm = lambda a: 2 * a * FP16  # noqa: E731
    if kind == "mlp_downsample_3x3_fix":  # LN(9m), Lin(9m, 3m), GELU, LN(3m), Lin(3m, h), GELU, Lin(h, h)
        expected = norm(9 * m) + linear(9 * m, 3 * m) + norm(3 * m) + linear(3 * m, h) + linear(h, h)
    else:  # 2x2: LN(4m), Lin(4m, h), GELU, Lin(h, h)
        expected = norm(4 * m) + linear(4 * m, h) + linear(h, h)
    assert table.nvila_parts(name, 4096, False)["projector"] == expected


def test_nvila_table_says_yes_exactly_where_the_sum_and_the_reserve_fit(table):
    lines = table.nvila_table(4096).splitlines()[2:]
    assert [line.split(" | ")[0].strip("| ") for line in lines] == [n for n in NVILA_VLMS for _ in (0, 1, 2)]
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        total = float(cells[5].removesuffix(" GB"))
        fits = cells[6:]
        assert fits == ["yes" if total + table.RESERVE_GB <= mem else "no" for _, mem in table.MODULES], line
    sums = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        sums.setdefault(cells[0], []).append(float(cells[5].removesuffix(" GB")))
    # the int8 tower row is the second, the smaller tables' the third
    assert all(fp16 > int8 > big for fp16, int8, big in sums.values())


def plain_grid(width: int, height: int, lo: int, hi: int) -> tuple[int, int]:
    """(cols, rows) with lo..hi tiles closest to the picture's aspect, (1, 1) when none (VILA's default)."""
    grids = [(c, r) for c in range(1, hi + 1) for r in range(1, hi + 1) if lo <= c * r <= hi]
    return min(grids, key=lambda g: abs(width / height - g[0] / g[1]), default=(1, 1))


@pytest.mark.parametrize("name", list(NVILA_VLMS))
@pytest.mark.parametrize("max_tiles", [NVILA_MAX_TILES, 1])
def test_nvila_picture_tiles_and_tokens_at_max_tiles(table, name, max_tiles):
    _, tower, kind, scales = NVILA_VLMS[name]
    tile, side = tower["image_size"], tower["image_size"] // tower["patch_size"]
    merge = 3 if "3x3" in kind else 2
    per_block = math.ceil(side / merge) ** 2  # the projector pads the grid to a multiple of its merge
    w, h = table.CAMERA_FRAME  # 4:3: every candidate grid list with 12 tiles holds (4, 3)
    if scales:  # dynamic S2: a square canvas per scale but the last, then the aspect grid; one block a tile there
        cols, rows = plain_grid(w, h, (scales[-1] // tile) ** 2, max_tiles)
        tiles = sum((s // tile) ** 2 for s in scales[:-1]) + cols * rows
        tokens = cols * rows * per_block
    else:  # NVILA-Lite: InternVL's tiles, a thumbnail after more than one
        cols, rows = plain_grid(w, h, 1, max_tiles) if max_tiles > 1 else (1, 1)
        tiles = cols * rows + (1 if cols * rows > 1 else 0)
        tokens = tiles * per_block
    assert table.nvila_picture(name, max_tiles) == (tiles, tokens)
    most = table.nvila_picture(name, max_tiles, None)[1]
    assert most >= tokens
    if max_tiles == 1:  # the smallest setting: the same for every picture
        assert most == tokens == (1 if not scales else 1) * per_block


def test_max_tiles_one_is_what_the_tokens_table_prints(table):
    text = table.nvila_tokens_table()
    for name in NVILA_VLMS:
        for max_tiles in (NVILA_MAX_TILES, 1):
            tiles, tokens = table.nvila_picture(name, max_tiles)
            label = f"{max_tiles} (default)" if max_tiles == NVILA_MAX_TILES else "1"
            assert f"| {name} | {label} | {tiles} | {tokens} |" in text


def test_readme_nvila_figures_are_the_tables(table):
    readme = (JETSON.parent / "README.md").read_text()
    para = readme[readme.index("**NVILA and VILA1.5-*-s2 today:**"):]
    para = " ".join(para[:para.index("\n\n")].split())
    w, h = table.CAMERA_FRAME
    full = {n: table.nvila_picture(n, NVILA_MAX_TILES) for n in ("NVILA-8B", "NVILA-Lite-2B")}
    one = {n: table.nvila_picture(n, 1) for n in ("NVILA-8B", "NVILA-Lite-2B")}
    assert (f"A {w}×{h} picture is {full['NVILA-8B'][1]} tokens for NVILA-8B ({full['NVILA-8B'][0]} tower tiles) "
            f"and {full['NVILA-Lite-2B'][1]} for NVILA-Lite-2B ({full['NVILA-Lite-2B'][0]} tiles)") in para
    assert (f"`--max-tiles 1` makes them {one['NVILA-8B'][1]} ({one['NVILA-8B'][0]} tiles) and "
            f"{one['NVILA-Lite-2B'][1]} ({one['NVILA-Lite-2B'][0]} tile)") in para
    gb = lambda name, int8=False, q=table.AWQ_INT4: sum(table.nvila_parts(name, 4096, int8, q).values()) / 1e9  # noqa: E731
    assert " / ".join(f"{gb(n):.1f}" for n in NVILA_VLMS) + " GB" in para
    assert f"NVILA-8B projects to {gb('NVILA-8B', True, table.AWQ_INT4_BIG_VOCAB):.1f} GB, within an 8 GB Orin" in para
