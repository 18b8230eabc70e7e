"""benchmarks/real_size.py's NVILA folders and its `nvila-ttft` mode, at the tiny size (the real-size run
is the lead's, on a quiet machine): the folders load as NVILA checkpoints with the tiling their config
names, the mode's counts are the runtime's, and its split adds up. No timing figure is asserted."""

from __future__ import annotations

import math

import pytest

from edge_vlm import load_model
from edge_vlm.benchmarks import real_size, shapes

QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("nvila-bench")
    return {name: real_size.build_nvila(name, root, tiny=True, **QUIET) for name in ("NVILA-Lite-2B", "NVILA-8B")}


def test_tiny_folders_load_with_their_projector_and_tiling(folders):
    lite = load_model(folders["NVILA-Lite-2B"], device="cpu", progress=False, llm_backend="torch")
    assert lite.projector.cfg.kind == "mlp_downsample_3x3_fix" and lite.s2 is None
    assert lite.tiling.max_tiles == shapes.NVILA_MAX_TILES and lite.tiling.thumbnail
    s2 = load_model(folders["NVILA-8B"], device="cpu", progress=False, llm_backend="torch")
    tile = shapes.TINY_NVILA_TOWER["image_size"]
    assert s2.s2.dynamic and s2.s2.scales == tuple(s * tile // 448 for s in shapes.NVILA_S2_SCALES)
    assert s2.projector.cfg.in_dim == shapes.TINY_NVILA_TOWER["hidden_size"] * len(shapes.NVILA_S2_SCALES)
    assert s2.llm.cfg.hidden_size == shapes.LLM_SHAPES[shapes.TINY_NVILA_LLM]["hidden_size"]


def test_a_second_build_reuses_the_folder(tmp_path):
    said = []
    first = real_size.build_nvila("NVILA-Lite-2B", tmp_path, tiny=True, log=said.append)
    built = len(said)
    assert built and real_size.build_nvila("NVILA-Lite-2B", tmp_path, tiny=True, log=said.append) == first
    assert len(said) == built


@pytest.mark.parametrize("name", ["NVILA-Lite-2B", "NVILA-8B"])
def test_ttft_rows_count_what_max_tiles_does_and_split_the_time(folders, name):
    full, small = (real_size.nvila_ttft(folders[name], m, repeats=1) for m in (None, 1))
    grid = shapes.TINY_NVILA_TOWER["image_size"] // shapes.TINY_NVILA_TOWER["patch_size"]
    merge = 3 if name == "NVILA-Lite-2B" else 2
    per_block = math.ceil(grid / merge) ** 2
    # a 640x480 picture: a 4x3 grid at the default 12 tiles (+ a thumbnail for Lite, + 1 + 4 lower-scale
    # tiles for S2); at --max-tiles 1 one tile (Lite) or 1 + 4 + 1 (S2), one block either way
    assert full["max_tiles"] == shapes.NVILA_MAX_TILES and small["max_tiles"] == 1
    if name == "NVILA-Lite-2B":
        assert (full["tower_tiles"], full["image_tokens"]) == (13, 13 * per_block)
        assert (small["tower_tiles"], small["image_tokens"]) == (1, per_block)
    else:
        assert (full["tower_tiles"], full["image_tokens"]) == (17, 12 * per_block)
        assert (small["tower_tiles"], small["image_tokens"]) == (6, per_block)
    assert full["prompt_tokens"] - small["prompt_tokens"] >= full["image_tokens"] - small["image_tokens"]
    for r in (full, small):
        assert r["tower_s"] > 0 and r["ttft_s"] > 0
        assert r["prefill_s"] == pytest.approx(r["ttft_s"] - r["tower_s"])


def test_cli_prints_both_rows(folders, capsys, tmp_path):
    assert real_size.main(["nvila-ttft", "--tiny", "--repeats", "1", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"| {shapes.NVILA_MAX_TILES} (default) | 13 |" in out and "| 1 | 1 |" in out


def test_a_tied_qwen2_is_written_without_lm_head_and_loads_tied(tmp_path, monkeypatch):
    # NVILA-Lite-2B's Qwen2-1.5B ties its lm_head to the embedding: the folder leaves lm_head out, as such
    # checkpoints do, and the loader shares the embedding
    from safetensors import safe_open

    monkeypatch.setitem(shapes.LLM_SHAPES, shapes.TINY_NVILA_LLM,
                        dict(shapes.LLM_SHAPES[shapes.TINY_NVILA_LLM], tie_word_embeddings=True))
    folder = real_size.build_nvila("NVILA-Lite-2B", tmp_path, tiny=True, **QUIET)
    with safe_open(str(folder / "llm" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    model = load_model(folder, device="cpu", progress=False, llm_backend="torch", fast_path=False)
    assert model.llm.lm_head.weight is model.llm.embed_tokens.weight


@pytest.mark.parametrize("name", list(shapes.NVILA_VLMS))
def test_real_size_projector_keys_are_the_ones_the_loader_maps(name):
    # the real folders are GBs (built by the benchmark only): their projector tensors are checked against
    # the runtime's projector of the same shape, renamed to VILA's keys as the loader renames them
    import torch

    from edge_vlm.formats.configs import ProjectorConfig
    from edge_vlm.models.projector import Projector, vila_module_names

    llm_shape, tower, kind, scales = shapes.NVILA_VLMS[name]
    mm, hidden = tower["hidden_size"] * (len(scales) if scales else 1), shapes.LLM_SHAPES[llm_shape]["hidden_size"]
    cfg = ProjectorConfig(kind, mm, hidden)
    with torch.device("meta"):
        ours = dict(Projector(cfg).named_parameters())
    rename = {ours_name: vila for vila, ours_name in vila_module_names(cfg).items()}
    expected = {f"{rename[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": tuple(p.shape) for k, p in ours.items()}
    assert dict(real_size._projector_tensors(kind, mm, hidden)) == expected
