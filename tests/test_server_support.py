"""Helpers of the server tests (no tests here): the real `edge-vlm serve` as a subprocess on a
free 127.0.0.1 port, media as data URIs, and reading /metrics."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
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


def in_process(model, **config):
    """(app, worker): the server's app over `model` (loaded here) in this process, for tests that
    must see inside the model (`Scripted`); `worker.close()` ends its thread."""
    from apps.server.app import ServerConfig, create_app
    from apps.server.worker import ModelWorker

    worker = ModelWorker(max_queue=4)
    worker.attach(model)
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
