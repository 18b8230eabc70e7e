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
