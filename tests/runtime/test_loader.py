"""Checkpoint file handling: sharded safetensors, .bin fallback, missing shards, dtypes."""

from __future__ import annotations

import json

import pytest
import torch

from edge_vlm import load_model
from edge_vlm.errors import CheckpointError
from tests.factories import make_llm


def logits(model, ids):
    return model.llm(model.llm.embed(ids), model.llm.new_cache(32), all_logits=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    make_llm(folder, "qwen2", seed=4)
    return folder, load_model(folder, device="cpu", progress=False)


def test_sharded_safetensors_load_the_same_weights(reference, tmp_path):
    folder, single = reference
    ref = make_llm(tmp_path / "sharded", "qwen2", seed=4)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    sharded = load_model(tmp_path / "sharded", device="cpu", progress=False)
    ids = torch.randint(0, 384, (1, 12))
    assert torch.equal(logits(sharded, ids), logits(single, ids))
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "sharded" / shard).unlink()
    with pytest.raises(CheckpointError, match=f"missing weight shard {shard}"):
        load_model(tmp_path / "sharded", device="cpu", progress=False)


@pytest.mark.parametrize("zipped", [True, False])  # mapped from the file / the legacy format, read whole
def test_pytorch_bin_fallback(reference, tmp_path, zipped):
    folder, single = reference
    ref = make_llm(tmp_path / "bin", "qwen2", seed=4)
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin", _use_new_zipfile_serialization=zipped)
    model = load_model(tmp_path / "bin", device="cpu", progress=False)
    ids = torch.randint(0, 384, (1, 12))
    assert torch.equal(logits(model, ids), logits(single, ids))


def test_config_that_does_not_match_the_weights(reference, tmp_path):
    import shutil

    folder, _ = reference
    shutil.copytree(folder, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape .* expected .*config.json does not match"):
        load_model(tmp_path / "m", device="cpu", progress=False)


def test_half_precision_load_stays_close(reference):
    """bf16 weights and activations: ~3 significant digits per op, so logits agree to ~1e-2 relative."""
    folder, single = reference
    half = load_model(folder, device="cpu", dtype=torch.bfloat16, progress=False)
    assert half.dtype == torch.bfloat16 and half.info.dtype == "bfloat16"
    ids = torch.randint(0, 384, (1, 12))
    a, b = logits(half, ids), logits(single, ids)
    assert float((a - b).abs().max() / b.abs().max()) < 5e-2


def test_meta_device_reads_headers_only(reference):
    folder, single = reference
    meta = load_model(folder, device="meta", progress=False)
    assert meta.llm.embed_tokens.weight.is_meta
    assert meta.info.params == single.info.params


def test_progress_callback_reports_every_stage(tiny_vila):
    seen: dict[str, list[tuple[int, int]]] = {}
    load_model(tiny_vila, device="cpu", progress=lambda stage, done, total: seen.setdefault(stage, []).append(
        (done, total)))
    assert list(seen) == ["loading LLM", "loading vision tower", "loading projector"]
    for calls in seen.values():
        dones = [d for d, _ in calls]
        assert dones == sorted(dones) and calls[-1][0] == calls[-1][1] > 0  # rises to done == total


def test_detect_layout_says_where_each_part_lives(tiny_vila, tiny_llava, reference):
    from edge_vlm.formats.checkpoint import TensorStore
    from edge_vlm.formats.layout import detect_layout

    vila = detect_layout(tiny_vila)
    assert (vila.kind, vila.llm_dir, vila.config_path, vila.vision_dir, vila.projector_dir, vila.layer_prefix) == (
        "vila", tiny_vila / "llm", tiny_vila / "llm" / "config.json", tiny_vila / "vision_tower",
        tiny_vila / "mm_projector", "model.layers.")
    llava = detect_layout(tiny_llava)
    assert llava.kind == "llava" and llava.llm_dir == llava.vision_dir == llava.projector_dir == tiny_llava
    keys = TensorStore(tiny_llava).keys()
    for prefix in (llava.layer_prefix + "0.", llava.vision_prefix, llava.projector_prefix):
        assert any(k.startswith(prefix) for k in keys), prefix
    text = detect_layout(reference[0])
    assert (text.kind, text.multimodal, text.quantization, text.llm.arch) == ("llm", False, None, "qwen2")


def test_older_llava_key_names_load_the_same_model(tiny_llava, tmp_path):
    import shutil

    from edge_vlm.formats.layout import detect_layout
    from tests.factories import use_older_llava_key_names

    old = tmp_path / "old"
    shutil.copytree(tiny_llava, old)
    use_older_llava_key_names(old)
    layout = detect_layout(old)
    assert (layout.llm_prefix, layout.head_prefix, layout.vision_prefix) == (
        "language_model.model.", "language_model.", "vision_tower.")
    new_model, old_model = (load_model(f, device="cpu", progress=False, fast_path=False) for f in (tiny_llava, old))
    ids = torch.randint(0, 380, (1, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(old_model, ids), logits(new_model, ids), rtol=0, atol=0)
    pixels = torch.rand(1, 3, 28, 28)
    torch.testing.assert_close(old_model.projector(old_model.vision(pixels)),
                               new_model.projector(new_model.vision(pixels)), rtol=0, atol=0)
