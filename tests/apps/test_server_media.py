"""The server's media limits, in process (a tiny VILA model): decoded-pixel budgets checked from
the headers before anything is decoded, per request and server-wide; pictures reduced to what
the model reads right after decoding; a full queue refused before any media is touched; and
remote media (--allow-remote-media) fetched only from addresses it may reach, on local test
servers: every hop checked, the checked address pinned, one error for every failure, one
deadline for the whole fetch."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import apps.server.messages as messages_module
import apps.server.remote as remote
from apps.server.media import Fit, MediaLimits
from edge_vlm.formats.configs import ImageConfig
from edge_vlm.imaging.preprocess import preprocess
from tests.apps.test_server_support import Gate, asgi_post, body_of, png_uri, status_of


def uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def one_bit_png(side: int) -> bytes:
    """A real side x side 1-bit PNG: a few KB that decode to side^2 pixels (x3 bytes as RGB)."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def ask(images: list[str], text: str = "What is this?") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return {"messages": [{"role": "user", "content": parts + [{"type": "text", "text": text}]}], "max_tokens": 1,
            "temperature": 0}


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if any picture is decoded (header reads are allowed)."""
    def refuse(*a, **k):
        raise AssertionError("a picture was decoded")

    monkeypatch.setattr(messages_module, "decode_image", refuse)
    monkeypatch.setattr(messages_module, "decode_video", refuse)


def test_eight_tiny_pngs_of_36_megapixels_are_refused_from_their_headers(served, no_decoding):
    png = one_bit_png(6000)
    assert len(png) < 10_000
    app, _ = served()
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json=ask([uri(png)] * 8))
        assert r.status_code == 400 and r.json()["error"]["code"] == "images_too_large", r.text
        assert "288000000 pixels" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "messages.0.content"


def test_a_full_queue_is_refused_before_any_media_is_read(served, monkeypatch):
    app, worker = served(max_queue=1)
    gate = Gate(worker.session.engine)
    touched = []
    monkeypatch.setattr(messages_module, "probe_image", lambda *a: touched.append(a) or 1 / 0)

    async def go():
        running = asyncio.create_task(asgi_post(app, {"messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 1}))
        while not gate.entered.is_set():
            await asyncio.sleep(0.01)
        refused = await asgi_post(app, ask([uri(one_bit_png(6000))] * 2))
        gate.open()
        await running
        return refused

    refused = asyncio.run(go())
    assert status_of(refused) == 503 and b"queue_full" in body_of(refused)
    assert touched == []


def test_the_server_wide_budget_refuses_while_others_decode_and_is_given_back(served, monkeypatch):
    app, _ = served(max_server_pixels=3_000_000)
    started, release = threading.Event(), threading.Event()
    real = messages_module.decode_image

    def slow_decode(probe, fit):
        started.set()
        assert release.wait(30)
        return real(probe, fit)

    monkeypatch.setattr(messages_module, "decode_image", slow_decode)
    big = png_uri(np.full((1000, 2000, 3), 90, np.uint8))  # 2 M pixels

    async def go():
        first = asyncio.create_task(asgi_post(app, ask([big])))
        while not started.is_set():
            await asyncio.sleep(0.01)
        second = await asgi_post(app, ask([big]))  # 2 M more: over the 3 M in flight
        release.set()
        return await first, second

    first, second = asyncio.run(go())
    assert status_of(second) == 503 and b"media_budget_full" in body_of(second)
    assert status_of(first) == 200
    monkeypatch.setattr(messages_module, "decode_image", real)
    with TestClient(app) as c:  # the first request gave its pixels back
        assert c.post("/v1/chat/completions", json=ask([big])).status_code == 200


def test_a_big_picture_reaches_the_model_reduced_and_its_memory_is_freed(served, model, monkeypatch):
    app, worker = served()
    seen = []
    real = worker.image_cache.encode
    monkeypatch.setattr(worker.image_cache, "encode", lambda ims: seen.extend(im.size for im in ims) or real(ims))
    side = model.image_cfg.size
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8))
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json=ask([uri(buf.getvalue(), "image/jpeg")]))
        assert r.status_code == 200, r.text
    (w, h), = seen
    assert min(w, h) <= 2 * side + 1 and min(w, h) >= side  # twice what the model resizes to, not 3000


PREPARATIONS = {  # ImageConfig fields of each way a picture reaches the tower
    "squash": dict(size=384),
    "pad": dict(size=336, pad_to_square=True),
    "squash_first": dict(size=384, squash_first=384),
    "shortest_edge_crop": dict(size=336, resize="shortest_edge", crop=True),
}


@pytest.mark.parametrize("mode", list(PREPARATIONS))
def test_reducing_changes_the_model_input_by_a_few_grey_levels(mode):
    """Bound: mean |diff| < 0.005 and max < 0.08 in normalised units (2.0 = the 0..255 range, so
    0.08 is about 10 grey levels, at a hard edge) against preprocessing the full picture, on photos
    enlarged 8x with hard edges; measured 0.0008-0.002 mean, 0.016-0.063 max (the most for "pad",
    whose padding edge moves by the rounding of the reduced size)."""
    from skimage import data

    class Model:
        image_cfg = ImageConfig(mean=(0.5,) * 3, std=(0.5,) * 3, **PREPARATIONS[mode])
        tiling = None

    fit = Fit(Model())
    for arr in (data.astronaut(), data.coffee()):
        big = Image.fromarray(arr).resize((arr.shape[1] * 8, arr.shape[0] * 8), Image.NEAREST)
        small = fit.reduce(big)
        assert small.size[0] < big.size[0] / 2
        d = (preprocess([big], Model.image_cfg) - preprocess([small], Model.image_cfg)).abs()
        assert d.mean() < 0.005 and d.max() < 0.08, (d.mean(), d.max())
    assert fit.reduce(Image.new("RGB", (500, 400))).size == (500, 400)  # near the working size: kept


def test_tiled_models_keep_their_grid_when_reduced():
    from edge_vlm.formats.configs import TilingConfig
    from edge_vlm.imaging.tiling import choose_grid

    class Model:
        image_cfg = None
        tiling = TilingConfig(tile_size=448, max_tiles=12)

    fit = Fit(Model())
    for w, h in [(8000, 6000), (12000, 3000), (6000, 6000), (20000, 1500)]:
        small = fit.target((w, h))
        assert small is not None and choose_grid(*small, Model.tiling) == choose_grid(w, h, Model.tiling)
        cols, rows = choose_grid(w, h, Model.tiling)
        assert small[0] >= 2 * cols * 448 - 1 and small[1] >= 2 * rows * 448 - 1 or \
            min(small[0] / (cols * 448), small[1] / (rows * 448)) >= 1.99


# ---- remote media --------------------------------------------------------------------------

PNG = base64.b64decode(png_uri(np.full((16, 16, 3), 200, np.uint8)).split(",")[1])


class MediaServer:
    """A local HTTP server: /cat.png, /missing (404), /to?url=... (a 302), /big (over the size limit),
    and the Host header of each request it saw."""

    def __init__(self):
        seen = self.hosts = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                seen.append(self.headers.get("Host"))
                if self.path == "/cat.png":
                    self._send(200, PNG)
                elif self.path.startswith("/to?url="):
                    self.send_response(302)
                    self.send_header("Location", self.path[len("/to?url="):])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/big":
                    self._send(200, b"\0" * (3 * 2**20))
                else:
                    self._send(404, b"no")

            def _send(self, code, data):
                self.send_response(code)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()


class Dripper:
    """A listener that answers 200 with a PNG's headers, then one byte every `every_s` seconds."""

    def __init__(self, every_s: float = 0.3):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.every_s = every_s
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn):
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n")
            while not self.stop.is_set():
                conn.sendall(b"\0")
                time.sleep(self.every_s)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.fixture(scope="module")
def media_server():
    s = MediaServer()
    yield s
    s.close()


def remote_app(served, hosts=("127.0.0.1/32",), **media):
    """The app with remote media on; `hosts` opens the loopback test servers (the allow-list's networks)."""
    return served(media=MediaLimits(remote=True, remote_hosts=tuple(hosts), max_bytes=2**20, **media))[0]


def error_of(app, url: str):
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json=ask([url]))
    return r.status_code, r.json().get("error", {})


def test_a_remote_image_from_an_allowed_host_is_fetched_pinned_to_the_checked_address(served, media_server,
                                                                                    monkeypatch):
    """The name resolves once per hop (a rebinding resolver's second answer is never asked for),
    the connection goes to that address, and the name stays in the Host header."""
    answers = []

    async def rebinding(host, port):
        answers.append(host)
        return ["127.0.0.1"] if len(answers) == 1 else ["10.0.0.1"]

    monkeypatch.setattr(remote, "resolve", rebinding)
    app = remote_app(served, hosts=("media.test", "127.0.0.1/32"))
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json=ask([media_server.url("/cat.png", host="media.test")]))
    assert r.status_code == 200, r.text
    assert answers == ["media.test"]
    assert media_server.hosts[-1] == f"media.test:{media_server.port}"


BLOCKED = ["http://127.0.0.1:{port}/cat.png", "http://localhost:{port}/cat.png", "http://[::1]:{port}/cat.png",
           "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png", "http://192.168.1.1/x.png",
           "http://100.64.0.1/x.png", "http://224.0.0.1/x.png", "http://0.0.0.0:{port}/cat.png",
           "http://[::ffff:127.0.0.1]:{port}/cat.png", "http://2130706433:{port}/cat.png"]


@pytest.mark.parametrize("template", BLOCKED, ids=lambda t: t.split("/")[2].split(":{")[0])
def test_loopback_private_link_local_and_multicast_addresses_are_never_fetched(served, media_server, template):
    app = remote_app(served, hosts=())  # no allow-list: any host, public addresses only
    before = len(media_server.hosts)
    status, err = error_of(app, template.format(port=media_server.port))
    assert status == 400 and err["code"] == "media_fetch_failed", err
    assert err["message"] == "the image URL could not be fetched"
    assert len(media_server.hosts) == before  # nothing reached the server


def test_every_redirect_hop_is_checked(served, media_server):
    app = remote_app(served, hosts=("127.0.0.1/32",))
    ok = media_server.url("/to?url=" + media_server.url("/cat.png"))
    assert error_of(app, ok)[0] == 200
    for target in ("http://10.0.0.1/cat.png", f"http://localhost:{media_server.port}/cat.png",
                   f"http://user:pw@127.0.0.1:{media_server.port}/cat.png", "file:///etc/passwd"):
        status, err = error_of(app, media_server.url("/to?url=" + target))
        assert (status, err["message"]) == (400, "the image URL could not be fetched"), target
    chain = media_server.url("/cat.png")
    for _ in range(4):  # four redirects: one more than allowed
        chain = media_server.url("/to?url=" + chain)
    assert error_of(app, chain)[0] == 400


def test_every_network_failure_gives_the_same_one_error(served, media_server, monkeypatch):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now

    async def no_such_name(host, port):
        raise socket.gaierror("Name or service not known")

    app = remote_app(served, hosts=("127.0.0.1/32", "nowhere.test"))
    urls = [media_server.url("/missing"), f"http://127.0.0.1:{port}/cat.png", media_server.url("/big")]
    errors = [error_of(app, u) for u in urls]
    monkeypatch.setattr(remote, "resolve", no_such_name)
    errors.append(error_of(app, "http://nowhere.test/cat.png"))
    assert {(s, e["message"], e["code"]) for s, e in errors} == {
        (400, "the image URL could not be fetched", "media_fetch_failed")}


@pytest.mark.parametrize("url,code", [
    ("http://user:secret@127.0.0.1/cat.png", "invalid_media"), ("ftp://127.0.0.1/cat.png", "unsupported"),
    ("http://elsewhere.example/cat.png", "remote_host_not_allowed")], ids=["credentials", "ftp", "not-allowed"])
def test_urls_refused_before_any_network_say_why(served, url, code):
    status, err = error_of(remote_app(served, hosts=("127.0.0.1/32",)), url)
    assert status == 400
    assert err["code"] == code if code != "unsupported" else "unsupported" in err["message"]


def test_a_dripping_server_cannot_hold_a_request_past_the_fetch_deadline(served):
    drip = Dripper()
    try:
        app = remote_app(served, remote_timeout_s=1.0)
        t0 = time.monotonic()
        status, err = error_of(app, f"http://127.0.0.1:{drip.port}/slow.png")
        assert (status, err["code"]) == (400, "media_fetch_failed") and time.monotonic() - t0 < 4
        # the request's own deadline is shorter than the fetch's: it wins, and says so
        app = served(request_timeout_s=1.0, media=MediaLimits(remote=True, remote_hosts=("127.0.0.1/32",),
                                                              remote_timeout_s=30))[0]
        t0 = time.monotonic()
        status, err = error_of(app, f"http://127.0.0.1:{drip.port}/slow.png")
        assert (status, err["code"]) == (504, "timeout") and time.monotonic() - t0 < 4
    finally:
        drip.close()
