"""`edge-vlm camera --server URL`: the camera pipeline as a client of a running server gives the
answers the same pipeline gives with the model loaded in its own process; a decompression bomb
in an image folder ends the camera with one line, not a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from tests.apps.test_server_support import Server
from tests.apps.test_server_vila import bomb_png

pytestmark = pytest.mark.slow


def camera(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_vlm.cli", "camera", *args], capture_output=True, text=True,
                          timeout=600, cwd=tempfile.gettempdir(), env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def answers(out: subprocess.CompletedProcess) -> list[tuple[int, str]]:
    assert out.returncode == 0, out.stderr[-2000:]
    return [(r["frame"], r["answer"]) for r in map(json.loads, out.stdout.splitlines())]


def test_camera_through_the_server_answers_like_a_local_model(tiny_vila, frames):
    flags = ["--source", str(frames), "--interval", "0", "--prompt", "What is this?", "--max-new-tokens", "6"]
    local = answers(camera("--model", str(tiny_vila), "--device", "cpu", "--llm-backend", "torch", *flags))
    s = Server(tiny_vila, env={"EDGE_VLM_API_KEY": "k"}).wait_ready()
    try:
        remote = camera("--server", s.url, *flags, env={"EDGE_VLM_API_KEY": "k"})
        assert answers(remote) == local and len(local) == 3
        assert f"at {s.url}" in remote.stderr
        wrong = camera("--server", s.url, "--api-key", "nope", *flags)
        assert wrong.returncode == 1 and "refused /v1/models" in wrong.stderr and "Traceback" not in wrong.stderr
    finally:
        s.stop()
    gone = camera("--server", s.url, *flags)
    assert gone.returncode == 1 and "cannot reach the server" in gone.stderr and "Traceback" not in gone.stderr


def test_a_decompression_bomb_in_a_folder_is_skipped_with_one_line(tiny_vila, tmp_path):
    (tmp_path / "00.png").write_bytes(bomb_png())
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "01.png")
    out = camera("--model", str(tiny_vila), "--device", "cpu", "--source", str(tmp_path), "--interval", "0",
                 "--max-new-tokens", "2")
    assert out.returncode == 0 and "Traceback" not in out.stderr
    skipped = [line for line in out.stderr.splitlines() if line.startswith("edge-vlm: skipping 00.png: ")]
    assert len(skipped) == 1 and "decompression bomb" in skipped[0].lower()
    assert [json.loads(line)["frame"] for line in out.stdout.splitlines()] == [0]  # the good image is answered
