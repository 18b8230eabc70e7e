"""NVILA (dynamic S2, a pooling video encoder) and NVILA-Lite through the apps: the server (in process)
answers image and video requests as a `ChatSession` does, a clip's frame count follows the checkpoint's
`num_video_frames` unless the request says, and the camera pipeline runs with `--max-tiles`.

Tiny random folders in NVILA's layout (tests/nvila_factory.py), as test_nvila.py uses."""

from __future__ import annotations

import base64
import io
import json

import pytest

from edge_vlm import ChatSession, GenerationConfig, load_model
from edge_vlm.cli import main
from tests.nvila_factory import make_nvila, make_nvila_lite
from tests.runtime.test_nvila import picture
from tests.runtime.test_vlm import write_video

GREEDY = GenerationConfig(max_new_tokens=4, temperature=0)
TSP = json.dumps({"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[2, 1, 1]]})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("nvila-apps")
    make_nvila(root / "nvila", seed=7, video_encoder=TSP, num_video_frames=4)
    make_nvila_lite(root / "lite", seed=8)
    return {"nvila": root / "nvila", "lite": root / "lite"}


def torch_model(folder, **kw):
    return load_model(folder, device="cpu", progress=False, fast_path=False, **kw)


def data_uri(kind: str, data: bytes) -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def ask_server(model, content, **extra):
    from fastapi.testclient import TestClient

    from tests.apps.test_server_support import in_process

    app, worker = in_process(model)
    try:
        with TestClient(app) as http:
            r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                        "max_tokens": 4, "temperature": 0, **extra})
            assert r.status_code == 200, r.text
            return r.json()
    finally:
        worker.close()


@pytest.mark.parametrize("name", ["nvila", "lite"])
def test_server_answers_an_image_request_like_a_chat_session(folders, name):
    img = picture(130, 70, seed=50)
    session = ChatSession(torch_model(folders[name]))
    expected = session.answer("What is in this picture?", images=[img], gen=GREEDY)
    body = ask_server(torch_model(folders[name]), [{"type": "image_url", "image_url": {"url": data_uri("image/png", png(img))}},
                                                   {"type": "text", "text": "What is in this picture?"}])
    assert body["choices"][0]["message"]["content"] == expected
    assert body["usage"]["prompt_tokens"] == session.stats.prompt_tokens


def test_a_clip_takes_num_video_frames_pooled_in_chat_and_in_the_server(folders, tmp_path):
    """NVILA's checkpoint says 4 frames, pooled in runs of 2: chat and the server sample 4 unless told,
    and the prompt holds 2 pooled blocks; a request's num_frames_per_inference still chooses."""
    model = torch_model(folders["nvila"])
    clip = write_video(tmp_path / "clip.mp4", frames=13, size=(80, 48))
    session = ChatSession(model)
    expected = session.answer("What happens?", video=clip, gen=GREEDY)
    text_only = ChatSession(model)
    text_only.answer("What happens?", gen=GREEDY)
    end = len(model.image_wrap_ids[1])
    assert session.stats.prompt_tokens == text_only.stats.prompt_tokens + 2 * (model.tokens_per_image + end)
    video = {"type": "video_url", "video_url": {"url": data_uri("video/mp4", clip.read_bytes())}}
    body = ask_server(torch_model(folders["nvila"]), [video, {"type": "text", "text": "What happens?"}])
    assert body["choices"][0]["message"]["content"] == expected
    assert body["usage"]["prompt_tokens"] == session.stats.prompt_tokens
    six = ChatSession(model)
    six.answer("What happens?", video=clip, frames=6, gen=GREEDY)
    body = ask_server(torch_model(folders["nvila"]), [video, {"type": "text", "text": "What happens?"}],
                      num_frames_per_inference=6)
    assert body["usage"]["prompt_tokens"] == six.stats.prompt_tokens > session.stats.prompt_tokens
    # frames that do not divide into the pooled runs: a 400 naming the field, and the server answers after
    from fastapi.testclient import TestClient

    from tests.apps.test_server_support import in_process

    app, worker = in_process(torch_model(folders["nvila"]))
    try:
        with TestClient(app) as http:
            request = {"messages": [{"role": "user", "content": [video, {"type": "text", "text": "What happens?"}]}],
                       "max_tokens": 2, "temperature": 0}
            r = http.post("/v1/chat/completions", json={**request, "num_frames_per_inference": 3})
            assert r.status_code == 400 and r.json()["error"]["param"] == "num_frames_per_inference"
            assert "multiple of 2 frames" in r.json()["error"]["message"]
            assert http.post("/v1/chat/completions", json=request).status_code == 200
    finally:
        worker.close()


def test_chat_cli_frames_default_follows_the_checkpoint(folders, tmp_path, capsys):
    clip = write_video(tmp_path / "clip.mp4", frames=13, size=(80, 48))
    args = ["chat", "--model", str(folders["nvila"]), "--backend", "torch", "--temperature", "0", "--video", str(clip),
            "--max-new-tokens", "2", "What happens?"]
    assert main(args) == 0
    default = capsys.readouterr()
    assert main(args + ["--frames", "3"]) == 1  # 3 frames do not divide into runs of 2: one line, no traceback
    err = capsys.readouterr().err
    assert "multiple of 2 frames" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert default.out.strip()


@pytest.mark.parametrize("name", ["nvila", "lite"])
def test_camera_pipeline_runs_nvila_and_max_tiles_cuts_the_tokens(folders, name, tmp_path, capsys):
    clip = write_video(tmp_path / "cam.mp4", frames=20, size=(160, 64))
    tokens = {}
    for tiles in (None, 1):
        extra = ["--max-tiles", str(tiles)] if tiles else []
        code = main(["camera", "--model", str(folders[name]), "--source", str(clip), "--interval", "1",
                     "--max-new-tokens", "2", "--max-context", "2048", "--device", "cpu", *extra])
        out, err = capsys.readouterr()
        assert code == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert [r["frame"] for r in lines] == [0, 10] and all(isinstance(r["answer"], str) for r in lines)
        tokens[tiles] = lines[0]["prompt_tokens"]
    assert tokens[1] < tokens[None]  # one tile: fewer image tokens than the picture's full tiling
