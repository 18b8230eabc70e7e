"""Helpers of the server tests (no tests here): the real `edge-vlm serve` as a subprocess on a
free 127.0.0.1 port, media as data URIs, and reading /metrics."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np
from PIL import Image

LOAD_TIMEOUT_S = 300  # a hang guard only: a loaded 2-core machine needs ~10-30 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m edge_vlm.cli serve ...` on 127.0.0.1; `stop()` ends it by its pid."""

    def __init__(self, model, *flags: str, env: dict | None = None, backend: str = "torch"):
        """`backend`: the LLM backend; "auto" (the CLI's default: llama.cpp on this CPU) where a test
        compares answers with `edge-vlm chat`'s default and decodes a lot, torch where a test needs a
        slow, steady generation (queue, timeout)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would block the server
        cmd = [sys.executable, "-m", "edge_vlm.cli", "serve", "--model", str(model), "--port", str(self.port),
               "--device", "cpu", "--backend", backend, *flags]
        # run outside the source tree: a stale *.egg-info there would shadow the installed entry points
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(),
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, headers: dict | None = None) -> "Server":
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.output()[-3000:]}")
            try:
                if httpx.get(self.url + "/v1/health/ready", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server not ready in time")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.output()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


def png_uri(image, fmt: str = "PNG") -> str:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def in_process(model, max_queue: int = 4, **config):
    """(app, worker): the server's app over `model` (loaded here) in this process, for tests that
    must see inside the model (`Scripted`); `worker.close()` ends its thread. Starlette's
    TestClient sends `Host: testserver`: the app is told that name, as --allowed-hosts would."""
    from apps.server.app import ServerConfig, create_app
    from apps.server.worker import ModelWorker

    worker = ModelWorker(max_queue=max_queue)
    worker.attach(model)
    config.setdefault("allowed_hosts", ("testserver",))
    return create_app(worker, ServerConfig(model_id="tiny", **config)), worker


class Scripted:
    """Records every token an engine is fed (prefill chunks, then each step); while `script` holds
    tokens, the logits favour them in order, so greedy decoding writes that text (a random tiny
    model never calls a tool by itself), and the cache holds exactly what was fed."""

    def __init__(self, engine, script: list[int] | None = None):
        self.fed: list[int] = []
        self.script: list[int] = list(script or [])
        real_prefill, real_step = engine.prefill, engine.step

        def force(logits):
            if self.script:
                logits = logits.clone()
                logits[self.script.pop(0)] = logits.max() + 1e4
            return logits

        def prefill(prompt):
            for chunk in prompt.chunks:
                self.fed += chunk
            return force(real_prefill(prompt))

        def step(token):
            self.fed.append(token)
            return force(real_step(token))

        engine.prefill, engine.step = prefill, step


class Gate:
    """Holds the model thread inside its next prefill until `open()`: the model is busy, the
    queue behind it fills, and nothing is generated meanwhile."""

    def __init__(self, engine):
        self.entered, self.opened = threading.Event(), threading.Event()
        real = engine.prefill

        def prefill(prompt):
            self.entered.set()
            assert self.opened.wait(60), "the gate was never opened"
            return real(prompt)

        engine.prefill = prefill

    def open(self) -> None:
        self.opened.set()


async def asgi_post(app, body: dict | bytes, path: str = "/v1/chat/completions", headers: dict | None = None,
                    leave: "asyncio.Event | None" = None, sent: list | None = None) -> list[dict]:
    """POST straight into the ASGI app, as uvicorn would; the client disconnects when `leave` is
    set (httpx's ASGI transport cannot). The messages the app sent, also live in `sent`."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"host": "127.0.0.1:8000", "content-type": "application/json", "content-length": str(len(data)),
            **{k.lower(): v for k, v in (headers or {}).items()}}
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(k.encode(), v.encode()) for k, v in hdrs.items()],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {}}
    leave = leave or asyncio.Event()
    out = sent if sent is not None else []
    given = False

    async def receive():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": data, "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        out.append(message)

    await app(scope, receive, send)
    return out


def status_of(messages: list[dict]) -> int | None:
    return next((m["status"] for m in messages if m["type"] == "http.response.start"), None)


def body_of(messages: list[dict]) -> bytes:
    return b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
