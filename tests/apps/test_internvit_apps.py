"""InternVL / NVLM-D through everything VILA runs through: the llama.cpp LLM backend (the Qwen2 LLM
exported to GGUF), the ONNX vision backend, several images and video frames (one tile each) in one
streamed turn, the server (in process, one image request) and the camera pipeline.

Tiny random models from transformers' native InternVL classes (tests/factories.py): the -hf layout
(InternVL's `<img>` format) and the same weights in NVLM-D's layout (tile tags, padding heads). The
6B-style tower (RMSNorm, q/k norm) is used, the one NVLM-D has. llama.cpp runs a Q8_0 export with
8-bit activations in its dot products, so its logits are compared with ours by cosine, as in
test_llamacpp_backend.py.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch

from edge_vlm import ChatSession, GenerationConfig, load_model
from tests.factories import make_internvl_hf, write_internvl_original
from tests.runtime.test_internvit import VARIANTS, picture
from tests.backends.test_llamacpp_backend import first_logits as llama_cpp_first_logits

GREEDY = GenerationConfig(max_new_tokens=4, temperature=0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl-apps")
    ref = make_internvl_hf(root / "hf", seed=21, projector_bias=False, intermediate_size=64, **VARIANTS["6b"])
    write_internvl_original(root / "nvlm", ref, root / "hf", style="nvlm", dummy_heads=2)
    return {"hf": root / "hf", "nvlm": root / "nvlm"}


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """GGUF and ONNX exports go to a folder of this module's."""
    monkeypatch.setenv("EDGE_VLM_CACHE", str(tmp_path_factory.getbasetemp() / "internvl-apps-cache"))


def torch_model(folder):
    return load_model(folder, device="cpu", progress=False, fast_path=False)


def first_logits(session: ChatSession, text: str, images=()) -> torch.Tensor:
    return llama_cpp_first_logits(session, text, images).float()


def cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


# ---------------------------------------------------------------- llama.cpp LLM backend

@pytest.mark.parametrize("name", ["hf", "nvlm"])
def test_llama_cpp_llm_matches_torch_on_a_tiled_image_prompt(folders, name):
    fast, ref = load_model(folders[name], device="cpu", progress=False, llm_backend="llama.cpp"), \
        torch_model(folders[name])
    assert fast.info.llm_backend == "llama.cpp" and fast.gguf_path.is_file()
    img, other = picture(30, (150, 70)), picture(31, (70, 150))
    assert fast.tile_count(img) > 2  # a grid and the thumbnail, each at its place in the prompt
    assert_llama_cpp_image_logits_agree(fast, ref, img, other)


def assert_llama_cpp_image_logits_agree(fast, ref, img, other):
    """The first logits after an image prompt, the LLM on llama.cpp (`fast`) against torch (`ref`): close by
    cosine, and the image matters the same way on both (another picture moves both logits alike)."""
    a, b = ChatSession(fast), ChatSession(ref)
    assert a.engine.name == "llama.cpp"
    got, want = first_logits(a, "What is in this picture?", [img]), first_logits(b, "What is in this picture?", [img])
    assert cosine(got, want) > 0.99
    got2 = first_logits(ChatSession(fast), "What is in this picture?", [other])
    want2 = first_logits(ChatSession(ref), "What is in this picture?", [other])
    assert cosine(got2 - got, want2 - want) > 0.9


def test_several_images_and_video_frames_stream_through_llama_cpp(folders, tmp_path):
    """Two tiled images and three video frames (one tile each) in one streamed turn: the prompt has the
    torch path's length, the streamed pieces are the answer, and a second turn continues the cache."""
    from tests.runtime.test_vlm import write_video

    fast, ref = load_model(folders["nvlm"], device="cpu", progress=False, llm_backend="llama.cpp"), \
        torch_model(folders["nvlm"])
    video = write_video(tmp_path / "clip.mp4", frames=12, size=(160, 64))
    a, b = picture(32, (150, 70)), picture(33, (60, 140))
    session = ChatSession(fast)
    pieces = list(session.ask("Two images and a clip.", images=[a, b], video=video, frames=3,
                              gen=GenerationConfig(max_new_tokens=6, temperature=0)))
    tiles = [fast.tile_count(p) for p in session._pictures([a, b], video, 3)]
    assert tiles[2:] == [1, 1, 1] and min(tiles[:2]) > 1
    # random byte-level tokens decode to few whole characters, so the stream may hold them to the end
    assert pieces and "".join(pieces) == session.turns[0].answer and session.stats.new_tokens >= 1
    assert session.turns[0].question.count("<image>") == 5
    reference = ChatSession(ref)
    reference.answer("Two images and a clip.", images=[a, b], video=video, frames=3, gen=GenerationConfig(max_new_tokens=1))
    assert session.stats.prompt_tokens == reference.stats.prompt_tokens
    assert session.stats.prompt_tokens > sum(tiles) * fast.tokens_per_image
    before = session.position
    assert isinstance(session.answer("And this one?", images=[b], gen=GREEDY), str)
    assert session.position - before >= fast.tile_count(b) * fast.tokens_per_image


# ---------------------------------------------------------------- ONNX vision backend

def test_onnx_tower_gives_the_torch_features_for_every_tile(folders):
    """NVLM-D's layout (padding heads dropped at load): the exported tower + mlp1 in ONNX Runtime, fp32
    within 1e-4 of torch (as for VILA, test_onnx_vision), and the int8 file judged as VILA's is."""
    from edge_vlm.backends.onnx import with_onnx_vision
    from edge_vlm.backends.onnx.int8 import MIN_COSINE, cosine as int8_cosine

    model = torch_model(folders["nvlm"])
    tiles = model.image_tiles(picture(34, (150, 70)))
    ref = model.encode_images(tiles)
    model = with_onnx_vision(model, "onnx", precision="fp32")
    assert model.info.vision_backend == "onnxruntime CPU fp32"
    got = model.encode_images(tiles)
    assert got.shape == ref.shape == (len(tiles), model.tokens_per_image, model.llm.cfg.hidden_size)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-4
    int8 = torch_model(folders["nvlm"])
    int8 = with_onnx_vision(int8, "onnx")
    assert int8.info.vision_backend == "onnxruntime CPU int8"
    assert int8_cosine(int8.encode_images(tiles), ref) >= MIN_COSINE
    # and a whole answer through it
    session = ChatSession(model)
    assert session.answer("What is this?", images=[picture(35)], gen=GREEDY) == \
        ChatSession(torch_model(folders["nvlm"])).answer("What is this?", images=[picture(35)], gen=GREEDY)


def test_int8_tower_exports_to_its_own_onnx_folder_and_keeps_its_features(folders):
    """vision_int8 + ONNX: the graph carries the rounded weights, so it is cached apart from the 16-bit
    tower's export, and in fp32 it gives the int8 torch tower's features."""
    from edge_vlm.backends.onnx import with_onnx_vision
    from edge_vlm.backends.onnx.cache import export_dir

    plain = torch_model(folders["nvlm"])
    q = load_model(folders["nvlm"], device="cpu", progress=False, fast_path=False, vision_int8=True)
    assert export_dir(q) != export_dir(plain) and export_dir(plain) == export_dir(torch_model(folders["nvlm"]))
    tiles = q.image_tiles(picture(37, (150, 70)))
    ref = q.encode_images(tiles)
    onnx = with_onnx_vision(q, "onnx", precision="fp32")
    assert onnx.info.vision_backend == "onnxruntime CPU fp32"
    assert float((onnx.encode_images(tiles) - ref).abs().max() / ref.abs().max()) <= 1e-4


# ---------------------------------------------------------------- server and camera

def png_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_server_answers_an_image_request_like_a_chat_session(folders):
    from fastapi.testclient import TestClient

    from tests.apps.test_server_support import in_process

    img = picture(36, (150, 70))
    expected = ChatSession(torch_model(folders["hf"])).answer("What is in this picture?", images=[img], gen=GREEDY)
    app, worker = in_process(torch_model(folders["hf"]))
    try:
        with TestClient(app) as http:
            content = [{"type": "image_url", "image_url": {"url": png_uri(img)}},
                       {"type": "text", "text": "What is in this picture?"}]
            r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                        "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["choices"][0]["message"]["content"] == expected
            model = worker.model
            assert body["usage"]["prompt_tokens"] > model.tile_count(img) * model.tokens_per_image
    finally:
        worker.close()


def test_camera_pipeline_answers_on_frames(folders, tmp_path, capsys):
    from edge_vlm.cli import main
    from tests.runtime.test_vlm import write_video

    clip = write_video(tmp_path / "cam.mp4", frames=20, size=(160, 64))
    code = main(["camera", "--model", str(folders["nvlm"]), "--source", str(clip), "--interval", "1",
                 "--max-new-tokens", "2", "--max-context", "512", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["frame"] for r in lines] == [0, 10] and all(isinstance(r["answer"], str) for r in lines)


def test_camera_context_frames_take_one_tile_each(folders, tmp_path, capsys):
    """A question about the last K frames is about a clip: tiled models give each frame one tile
    (InternVL's video recipe), a lone frame is tiled like a photo."""
    from edge_vlm.cli import main
    from tests.runtime.test_vlm import write_video

    clip = write_video(tmp_path / "cam.mp4", frames=20, size=(160, 64))  # 2.5:1, several tiles + thumbnail
    code = main(["camera", "--model", str(folders["nvlm"]), "--source", str(clip), "--interval", "1",
                 "--context-frames", "2", "--max-new-tokens", "1", "--max-context", "2048", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    alone, clip_of_two = [json.loads(line) for line in out.splitlines()]
    assert (alone["images"], clip_of_two["images"]) == (1, 2)
    model = torch_model(folders["nvlm"])
    per_tile, tiles = model.tokens_per_image, model.tile_count(picture(1, (160, 64)))
    assert tiles >= 3
    # one frame tiled outweighs two frames of one tile each
    assert 2 * per_tile < clip_of_two["prompt_tokens"] < alone["prompt_tokens"]  # tiled twice it would be ~2x


def test_server_video_frames_take_one_tile_each_like_chat(folders, tmp_path):
    """A video sent to the server is the video `ChatSession.ask(video=...)` sees: the same sampled
    frames, one tile each, so the same prompt and the same answer."""
    from fastapi.testclient import TestClient

    from tests.apps.test_server_support import in_process
    from tests.runtime.test_vlm import write_video

    clip = write_video(tmp_path / "clip.mp4", frames=12, size=(160, 64))  # a still would take 3+ tiles
    session = ChatSession(torch_model(folders["hf"]))
    expected = session.answer("What happens?", video=clip, frames=3, gen=GREEDY)
    want_tokens = session.stats.prompt_tokens
    app, worker = in_process(torch_model(folders["hf"]))
    try:
        with TestClient(app) as http:
            uri = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
            content = [{"type": "video_url", "video_url": {"url": uri}}, {"type": "text", "text": "What happens?"}]
            r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                        "max_tokens": 4, "temperature": 0,
                                                        "num_frames_per_inference": 3})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["usage"]["prompt_tokens"] == want_tokens
            assert body["choices"][0]["message"]["content"] == expected
    finally:
        worker.close()
