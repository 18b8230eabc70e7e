"""benchmarks/real_size.py's folder builder, on tiny shapes (the real ones are GBs: built only by the
benchmark): the folders it writes are ones the loader and `edge-vlm quantize` take as they take a
real checkpoint, and a second build reuses the cached folder."""

from __future__ import annotations

import pytest
import torch

from edge_vlm.benchmarks import real_size, shapes

TEXT = dict(shapes.LLM_SHAPES["tiny"], vocab_size=512)  # room for the byte-level tokenizer's alphabet
CLIP = dict(shapes.TINY_TOWER, arch="clip", hidden_act="quick_gelu", drop_cls=True)


@pytest.fixture(autouse=True)
def tiny_text_shape(monkeypatch):
    monkeypatch.setitem(shapes.LLM_SHAPES, "tiny-512", TEXT)
    monkeypatch.setitem(real_size.LLM_SHAPES, "tiny-512", TEXT)


@pytest.mark.parametrize("projector,tower,kind", [("mlp_downsample", shapes.TINY_TOWER, "vila"),
                                                   ("mlp2x_gelu", CLIP, "llava")])
def test_built_folder_loads_quantizes_and_is_reused(tmp_path, projector, tower, kind):
    from edge_vlm import load_model
    from edge_vlm.formats.layout import detect_layout
    from edge_vlm.quantize.pipeline import QuantizeSettings, quantize_checkpoint

    folder = real_size.build_folder(tmp_path / "model", "tiny-512", tower, projector, log=lambda m: None)
    layout = detect_layout(folder)
    assert layout.kind == kind and layout.llm.hidden_size == TEXT["hidden_size"]
    assert layout.llm.num_layers == TEXT["num_layers"] and layout.llm.vocab_size == 512
    model = load_model(str(folder), device="cpu", progress=False)
    assert model.vision is not None
    ids = torch.tensor([[1, 5, 9, 200]])
    logits = model.llm(model.llm.embed(ids), model.llm.new_cache(8))
    assert torch.isfinite(logits).all()
    summary = quantize_checkpoint(folder, tmp_path / "out", QuantizeSettings(group_size=32, n_samples=2, seqlen=64,
                                                                            matmul="fp32"),
                                  progress=False, log=lambda m: None)
    assert len(summary.layer_losses) == TEXT["num_layers"]
    stamp = (folder / real_size.MARKER).stat().st_mtime_ns
    assert real_size.build_folder(folder, "tiny-512", tower, projector, log=lambda m: None) == folder
    assert (folder / real_size.MARKER).stat().st_mtime_ns == stamp  # cached: not rebuilt


def test_a_changed_shape_rebuilds_the_folder(tmp_path, monkeypatch):
    folder = real_size.build_folder(tmp_path / "m", "tiny-512", shapes.TINY_TOWER, "mlp_downsample", log=lambda m: None)
    monkeypatch.setitem(real_size.LLM_SHAPES, "tiny-512", dict(TEXT, intermediate_size=192))
    real_size.build_folder(folder, "tiny-512", shapes.TINY_TOWER, "mlp_downsample", log=lambda m: None)
    from edge_vlm.formats.layout import detect_layout

    assert detect_layout(folder).llm.intermediate_size == 192


def test_big_weights_go_to_numbered_shards_with_an_index(tmp_path, monkeypatch):
    import json

    from safetensors.torch import load_file

    monkeypatch.setattr(real_size, "SHARD_BYTES", 2000)  # a: one shard; b and its norm: the next
    tensors = [("a.weight", (20, 30)), ("b.weight", (20, 30)), ("b.norm.weight", (30,))]
    real_size._write_weights(tmp_path, tensors, seed=0)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    b = load_file(str(tmp_path / index["weight_map"]["b.weight"]))
    assert b["b.weight"].dtype == torch.float16 and 0.01 < float(b["b.weight"].float().std()) < 0.03
    assert torch.equal(b["b.norm.weight"], torch.ones(30, dtype=torch.float16))


def test_layer_timing_and_gpu_estimate_run_on_a_tiny_shape():
    from edge_vlm.quantize.pipeline import QuantizeSettings

    r = real_size.time_layer("tiny", QuantizeSettings(n_samples=2, seqlen=64), matmul="fp32")
    assert set(r["steps"]) == set(real_size.TIMED) and r["seconds"] >= sum(r["steps"].values()) * 0.99
    table = real_size.layer_table(r)
    assert "| scale search |" in table and "fp32 products" in table
    assert "| vila1.5-3b | H100 SXM |" in real_size.gpu_estimate(shapes=("vila1.5-3b",))
