"""`edge-vlm serve` with images and video: a VILA folder pairing the real SmolLM2 with a random
SigLIP tower (384 px, 196 tokens per image). Images inline as NIM sends them and as OpenAI parts,
the same answer as `edge-vlm chat --image`, video frames, the image-embedding cache and the
prefix cache, the media error rows; and 200 image requests with the server's memory flat."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import tempfile
import zlib
import struct

import cv2
import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.apps.test_server_support import Server, metric, png_uri

pytestmark = pytest.mark.slow
SEEDED = dict(temperature=0.7, top_p=0.9, seed=3, max_tokens=8)


@pytest.fixture(scope="module")
def server(real_vila, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    s = Server(real_vila, "--max-context", "1024", "--max-images", "4", "--media-dir", str(media),
               backend="auto").wait_ready()
    s.media = media
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def cat():
    from skimage import data

    return Image.fromarray(data.chelsea())


def parts(image_uri: str, text: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": image_uri}}, {"type": "text", "text": text}]


def good(server) -> None:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=300,
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text


def test_openai_image_parts_answer_like_edge_vlm_chat_with_the_image(server, client, real_vila, cat, tmp_path):
    path = tmp_path / "cat.png"
    cat.save(path)
    cli = subprocess.run([sys.executable, "-m", "edge_vlm.cli", "chat", "--model", str(real_vila), "--device", "cpu",
                          "--quiet", "--image", str(path), "--temperature", "0.7", "--top-p",
                          "0.9", "--seed", "3", "--max-new-tokens", "8", "What is in this picture?"],
                         capture_output=True, text=True, timeout=600, cwd=tempfile.gettempdir())
    assert cli.returncode == 0, cli.stderr[-2000:]
    expected = cli.stdout[:-1]
    messages = [{"role": "user", "content": parts(png_uri(cat), "What is in this picture?")}]
    r = client.chat.completions.create(model="vila", messages=messages, **SEEDED)
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens > 196  # the image's 196 tokens and the text
    stream = client.chat.completions.create(model="vila", messages=messages, stream=True, **SEEDED)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def nim_request(server, body: dict) -> tuple[str, dict]:
    """POST as NIM's sample code does; (answer, usage) for stream false and true alike."""
    headers = {"Accept": "text/event-stream" if body["stream"] else "application/json"}
    if not body["stream"]:
        r = httpx.post(server.url + "/v1/vlm/nvidia/vila", headers=headers, json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.json()["usage"]
    text, usage = [], None
    with httpx.stream("POST", server.url + "/v1/vlm/nvidia/vila", headers=headers, json=body, timeout=300) as s:
        assert s.status_code == 200
        for line in s.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                if chunk["choices"]:
                    text.append(chunk["choices"][0]["delta"].get("content") or "")
    return "".join(text), usage


def test_nim_sample_body_with_an_inline_image_both_ways(server, cat):
    buf = io.BytesIO()
    cat.save(buf, format="JPEG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    body = {"messages": [{"role": "user", "content": f'Describe the scene <img src="data:image/jpeg;base64,{b64}" />'}],
            "max_tokens": 8, "temperature": 0.2, "top_p": 0.7, "seed": 50, "num_frames_per_inference": 8,
            "stream": False}
    answer, _ = nim_request(server, body)
    streamed, usage = nim_request(server, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert streamed == answer and answer
    assert usage["prompt_tokens"] > 196


def video_uri(frames: int = 10) -> str:
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        out = cv2.VideoWriter(f.name, cv2.VideoWriter_fourcc(*"mp4v"), 5, (64, 48))
        for i in range(frames):
            out.write(np.full((48, 64, 3), i * 20, np.uint8))
        out.release()
        return "data:video/mp4;base64," + base64.b64encode(open(f.name, "rb").read()).decode()


def test_a_video_becomes_num_frames_images(server, client):
    uri = video_uri()
    for frames in (1, 2):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=300, json={
            "messages": [{"role": "user", "content": f'What happens? <video src="{uri}" />'}],
            "max_tokens": 1, "temperature": 0, "num_frames_per_inference": frames})
        assert r.status_code == 200, r.text
        if frames == 1:
            one = r.json()["usage"]["prompt_tokens"]
    assert r.json()["usage"]["prompt_tokens"] == one + 196
    r = client.chat.completions.create(model="vila", max_tokens=1, temperature=0, extra_body={
        "num_frames_per_inference": 2}, messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": uri}}, {"type": "text", "text": "What happens?"}]}])
    assert r.usage.prompt_tokens == one + 196 + 1  # the mark lines and the text: one more newline token


def test_a_resent_image_is_not_encoded_again_and_a_second_turn_reuses_the_cache(server, client, cat):
    img = png_uri(cat.rotate(90, expand=True))
    ask = lambda msgs: client.chat.completions.create(model="vila", messages=msgs, max_tokens=6,  # noqa: E731
                                                      temperature=0)
    before = httpx.get(server.url + "/metrics").text
    first = ask([{"role": "user", "content": parts(img, "What is this?")}])
    assert first.model_extra["timings"]["vision_ms"] > 0
    again = ask([{"role": "user", "content": parts(img, "Describe it.")}])  # a new conversation, same image
    assert again.model_extra["timings"]["vision_ms"] < first.model_extra["timings"]["vision_ms"]  # a lookup
    after = httpx.get(server.url + "/metrics").text
    assert metric(after, "edge_vlm_image_cache_hits") - metric(before, "edge_vlm_image_cache_hits") == 1
    assert metric(after, "edge_vlm_image_cache_misses") - metric(before, "edge_vlm_image_cache_misses") == 1
    # same image, same question as the first: the cached embeddings give the same answer
    assert ask([{"role": "user", "content": parts(img, "What is this?")}]).choices[0].message.content == \
        first.choices[0].message.content
    # a second turn of the image chat runs only its own tokens
    convo = [{"role": "user", "content": parts(img, "What is this?")},
             {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And the colours?"}]
    second = ask(convo)
    cached = second.model_extra["timings"]["cached_prompt_tokens"]
    assert cached == second.usage.prompt_tokens_details.cached_tokens > 196


def bomb_png(side: int = 14000) -> bytes:
    """A PNG whose header says side x side pixels (its data is one short compressed row block)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + \
        chunk(b"IEND", b"")


def uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()




def media_rows(server):
    small = png_uri(np.zeros((8, 8, 3), np.uint8))
    user = lambda content: {"messages": [{"role": "user", "content": content}], "max_tokens": 1}  # noqa: E731
    (server.media / "ok.png").write_bytes(base64.b64decode(small.split(",")[1]))
    return [
        ("bad base64", user(parts("data:image/png;base64,@@not base64@@", "x")), "invalid_base64"),
        ("not an image", user(parts(uri(b"hello, not a picture"), "x")), "invalid_image"),
        ("not base64 data URI", user(parts("data:image/png,rawbytes", "x")), "invalid_media"),
        ("decompression bomb", user(parts(uri(bomb_png()), "x")), "image_too_large"),
        ("inline bomb", user(f'Look <img src="{uri(bomb_png())}" />'), "image_too_large"),
        ("too many images", user([{"type": "image_url", "image_url": {"url": small}}] * 5), "too_many_images"),
        ("not a video", user([{"type": "video_url", "video_url": {"url": uri(b"nope", "video/mp4")}}]),
         "invalid_video"),
        ("image in an assistant message", {"messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": parts(small, "x")},
            {"role": "user", "content": "Hi"}]}, "invalid_media"),
        ("remote URL (off by default)", user(parts("http://127.0.0.1:9/cat.png", "x")), "remote_media_disabled"),
        ("file URL outside the media folder", user(parts("file:///etc/passwd", "x")), "file_media_outside"),
        ("an <image> mark in the text", user("Look <image> here"), "invalid_value"),
    ]


def test_media_error_rows_are_400s_and_the_server_keeps_serving(server):
    for name, body, code in media_rows(server):
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 400, (name, r.text)
        err = r.json()["error"]
        assert err["code"] == code, (name, err)
        assert err["param"].startswith("messages.") and "Traceback" not in r.text
        good(server)
    ok = {"messages": [{"role": "user", "content": parts(f"file://{server.media / 'ok.png'}", "x")}], "max_tokens": 1}
    assert httpx.post(server.url + "/v1/chat/completions", json=ok, timeout=300).status_code == 200


def one_bit_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _proc_counts(pid: int) -> tuple[int, int]:
    """(open file descriptors, threads) of a process."""
    import os

    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def test_a_soak_of_valid_invalid_and_over_budget_images_keeps_memory_fds_and_threads_flat(tiny_vila):
    """220 requests from 4 clients at once: a different 256x256 image each (kept by no cache
    beyond its 16 entries), a corrupt one, eight 36-megapixel PNGs (refused from their headers),
    and one 36-megapixel PNG that is decoded (108 MB as RGB) and reduced at once. Bounds, from
    after the 20 warm-up requests to the end: RSS within +10% (a kept 108 MB decode or any
    per-request leak would pass it), the same open fds and threads (+2 for a connection or
    worker thread in flight at the moment of reading)."""
    from concurrent.futures import ThreadPoolExecutor

    s = Server(tiny_vila, "--image-cache", "16", "--max-queue", "64", backend="auto").wait_ready()
    try:
        base = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
        big = uri(one_bit_png(6000))
        with httpx.Client(base_url=s.url, timeout=300, limits=httpx.Limits(max_connections=8)) as c:
            def ask(i):
                kind = i % 10
                if kind == 3:
                    images, want = [uri(b"\x89PNG\r\n\x1a\n not really")], 400
                elif kind == 6:
                    images, want = [big] * 8, 400
                elif kind == 9:
                    images, want = [big], 200
                else:
                    img = base.copy()  # a different image each time (a block big enough to survive the reduction)
                    img[:96, :96] = (i % 256, i // 256, 7)
                    images, want = [png_uri(img)], 200
                r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
                    *({"type": "image_url", "image_url": {"url": u}} for u in images),
                    {"type": "text", "text": "What is this?"}]}], "max_tokens": 2, "temperature": 0})
                assert r.status_code == want, (i, r.text[:300])

            with ThreadPoolExecutor(4) as pool:
                list(pool.map(ask, range(20)))
                rss0 = metric(c.get("/metrics").text, "edge_vlm_memory_bytes", kind="rss")
                fds0, threads0 = _proc_counts(s.proc.pid)
                list(pool.map(ask, range(20, 220)))
            text = c.get("/metrics").text
            rss1 = metric(text, "edge_vlm_memory_bytes", kind="rss")
            fds1, threads1 = _proc_counts(s.proc.pid)
        distinct = sum(i % 10 not in (3, 6, 9) for i in range(220))
        assert metric(text, "edge_vlm_image_cache_misses") == distinct + 1  # and the big one, once
        assert rss1 < 1.10 * rss0, f"RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MB"
        assert fds1 <= fds0 + 2 and threads1 <= threads0 + 2, (fds0, fds1, threads0, threads1)
    finally:
        s.stop()
