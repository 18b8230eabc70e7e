"""Every bad input gives one readable line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from edge_vlm import ChatSession, GenerationConfig, load_model
from edge_vlm.cli import main
from edge_vlm.errors import CheckpointError, ContextOverflowError, MediaError, UnsupportedModelError


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_safetensors(tiny_vila, tmp_path, capsys):
    m = copy_model(tiny_vila, tmp_path / "m")
    (m / "llm" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in .*llm"):
        load_model(m, device="cpu", progress=False)
    code, err = run_cli(capsys, "chat", "--model", str(m), "hi")
    assert code == 1 and err.count("\n") == 0 and err.startswith("edge-vlm: error: no weights")


def test_truncated_safetensors(tiny_vila, tmp_path, capsys):
    m = copy_model(tiny_vila, tmp_path / "m")
    f = m / "vision_tower" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"truncated: \d+ bytes on disk, \d+ expected"):
        load_model(m, device="cpu", progress=False)
    code, err = run_cli(capsys, "info", str(m))
    assert code == 1 and "truncated" in err and err.count("\n") == 0


def test_corrupt_safetensors_header(tiny_vila, tmp_path):
    m = copy_model(tiny_vila, tmp_path / "m")
    (m / "mm_projector" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_model(m, device="cpu", progress=False)


def test_weights_missing_a_tensor(tiny_llava, tmp_path):
    from safetensors.torch import load_file, save_file

    m = copy_model(tiny_llava, tmp_path / "m")
    tensors = load_file(m / "model.safetensors")
    name = next(k for k in tensors if "layers.1.mlp.down_proj" in k)
    del tensors[name]
    save_file(tensors, m / "model.safetensors")
    with pytest.raises(CheckpointError, match="lack layers.1.mlp.down_proj.weight"):
        load_model(m, device="cpu", progress=False)


def test_unsupported_architecture_names_the_supported_ones(tiny_vila, tmp_path, capsys):
    m = copy_model(tiny_vila / "llm", tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (m / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="'mamba'.*supported: .*Llama / Qwen2 / Nemotron"):
        load_model(m, device="cpu", progress=False)
    vila = copy_model(tiny_vila, tmp_path / "v")
    (vila / "llm" / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli(capsys, "chat", "--model", str(vila), "hi")
    assert code == 1 and "unsupported language model type 'mamba'; supported: llama, qwen2, nemotron" in err


def test_missing_model_folder_and_config(tmp_path, capsys):
    code, err = run_cli(capsys, "chat", "--model", str(tmp_path / "nope"), "hi")
    assert code == 1 and "model folder not found" in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_model(tmp_path / "empty", device="cpu")


def test_hub_repo_id_offline_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code, err = run_cli(capsys, "chat", "--model", "someone/not-cached-model", "hi")
    assert code == 1 and err.count("\n") == 0
    assert "'someone/not-cached-model' is not a local folder and could not be fetched" in err


def test_hub_repo_id_uses_huggingface_hub(monkeypatch, tiny_vila):
    from edge_vlm.formats import checkpoint

    calls = []
    monkeypatch.setattr(checkpoint, "snapshot_download", lambda repo, **kw: calls.append(repo) or str(tiny_vila))
    model = load_model("Efficient-Large-Model/VILA1.5-3b", device="cpu", progress=False)
    assert calls == ["Efficient-Large-Model/VILA1.5-3b"] and model.info.layout == "vila"


def test_bad_images(tiny_vila, tmp_path, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture")
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])
    for path, words in [(text, "not an image or corrupt"), (truncated, "not an image or corrupt"),
                        (tmp_path / "missing.png", "image not found")]:
        code, err = run_cli(capsys, "chat", "--model", str(tiny_vila), "--image", str(path), "hi")
        assert code == 1 and words in err and err.count("\n") == 0, err
    session = ChatSession(load_model(tiny_vila, device="cpu", progress=False))
    with pytest.raises(MediaError):
        session.answer("hi", images=[truncated])
    assert session.messages == []  # nothing was half-recorded


def test_unreadable_video(tiny_vila, tmp_path, capsys):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video")
    session = ChatSession(load_model(tiny_vila, device="cpu", progress=False))
    with pytest.raises(MediaError, match="cannot read video"):
        session.answer("what happens?", video=bad)
    code, err = run_cli(capsys, "chat", "--model", str(tiny_vila), "--video", str(tmp_path / "none.mp4"), "hi")
    assert code == 1 and "video not found" in err


def test_prompt_longer_than_the_context_says_by_how_much(tiny_vila, capsys):
    model = load_model(tiny_vila, device="cpu", progress=False, max_context=200)
    session = ChatSession(model)
    with pytest.raises(ContextOverflowError, match=r"over by \d+") as e:
        session.answer("word " * 400)
    need = int(str(e.value).split("needs ")[1].split(" ")[0])
    over = int(str(e.value).split("over by ")[1].split(";")[0])
    assert need - over == 199  # the context keeps one slot for the first generated token
    assert session.messages == [] and session.engine.position == 0
    code, err = run_cli(capsys, "chat", "--model", str(tiny_vila), "--max-context", "200", "word " * 400)
    assert code == 1 and "over by" in err


def test_too_many_images_for_the_context(tiny_vila):
    model = load_model(tiny_vila, device="cpu", progress=False, max_context=200)
    images = [np.zeros((8, 8, 3), np.uint8) + i for i in range(40)]
    with pytest.raises(ContextOverflowError, match=r"40 images x 4 tokens.*over by"):
        ChatSession(model).answer("compare", images=images, gen=GenerationConfig(max_new_tokens=2))


def test_images_for_a_text_only_model(tiny_vila, capsys):
    code, err = run_cli(capsys, "chat", "--model", str(tiny_vila / "llm"), "--image", str(tiny_vila / "x.png"), "hi")
    assert code == 1  # the image is missing: checked before the model loads
    session = ChatSession(load_model(tiny_vila / "llm", device="cpu", progress=False))
    with pytest.raises(Exception, match="text-only"):
        session.answer("hi", images=[np.zeros((8, 8, 3), np.uint8)])


@pytest.mark.parametrize("field", [{"s2": True}, {"dynamic_s2": True, "image_aspect_ratio": "dynamic_s2"}])
def test_vila_s2_without_its_scales_is_refused_clearly(tiny_vila, tmp_path, field):
    """S2 checkpoints load now (tests/runtime/test_nvila.py); one that lacks s2_scales is one line naming the key."""
    m = copy_model(tiny_vila, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, **field}))
    with pytest.raises(UnsupportedModelError, match="s2_scales None is not a list of image sizes") as e:
        load_model(m, device="cpu", progress=False)
    assert "\n" not in str(e.value)


def test_unknown_projector_is_refused_clearly(tiny_vila, tmp_path):
    m = copy_model(tiny_vila, tmp_path / "m")
    (m / "mm_projector" / "config.json").write_text(json.dumps({"mm_projector_type": "mlp_downsample_4x4"}))
    with pytest.raises(UnsupportedModelError, match="unsupported projector 'mlp_downsample_4x4'; supported"):
        load_model(m, device="cpu", progress=False)


def test_a_decompression_bomb_image_is_one_line_in_the_cli(tiny_vila, tmp_path, capsys):
    """A 14000 x 14000 PNG (196 Mpixel, over Pillow's bomb limit): refused from its header, one line."""
    from PIL import Image

    from edge_vlm.cli import main

    bomb = tmp_path / "bomb.png"
    Image.new("1", (14000, 14000)).save(bomb)  # 1-bit: a few kB on disk
    assert main(["chat", "--model", str(tiny_vila), "--backend", "torch", "--image", str(bomb), "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("edge-vlm: error: cannot read image") and "decompression bomb" in err.lower()
    assert len(err.splitlines()) == 1
