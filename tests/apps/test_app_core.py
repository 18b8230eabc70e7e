"""The desktop app's Qt-free parts: camera feed, saved conversations, Markdown, error messages, CLI."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_vlm.apps.desktop.camera import CameraFeed, open_camera
from edge_vlm.apps.desktop.conversation import Conversation
from edge_vlm.apps.desktop.render import markdown_to_html
from edge_vlm.apps.media.frame_sources import PacedSource
from edge_vlm.errors import EdgeVLMError, MediaError
from tests.fakes import FakeCamera

WAIT_S = 30  # generous: a deadline for what must happen, never a measure of how fast


def write_video(path: Path, n: int, fps: int = 50) -> Path:
    import cv2

    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (128, 96))
    assert out.isOpened()
    for i in range(n):
        out.write(FakeCamera.frame(i)[:, :, ::-1].copy())  # OpenCV writes BGR
    out.release()
    return path


# ---- camera feed ---------------------------------------------------------------------------

def wait_for(condition, what: str) -> None:
    """Poll until `condition()` holds; fail (saying what was awaited) after WAIT_S seconds."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_feed_hands_out_only_the_newest_frame_and_counts_the_rest_as_dropped():
    feed = CameraFeed(FakeCamera(fps=400))
    feed.start()
    try:
        seen = []
        while len(seen) < 5:
            seq, frame = feed.take()
            if frame is None:
                wait_for(lambda: feed.captured > 0, "the first frame")
                continue
            # the frame handed out is the newest one captured, unaltered
            assert FakeCamera.frame_number(frame) == seq - 1
            assert np.array_equal(frame, FakeCamera.frame(seq - 1))
            seen.append(seq)
            # a slow consumer, like a model answering: two more frames arrive before it asks again
            wait_for(lambda: feed.captured >= seq + 2, "two more frames")
        assert all(b > a + 1 for a, b in zip(seen, seen[1:]))  # frames in between were skipped
    finally:
        feed.stop()
    assert not feed.running
    seq, _ = feed.latest()
    untaken = 0 if feed._taken_index + 1 == seq else 1
    assert feed.dropped + feed.taken + untaken == feed.captured  # nothing waits in a queue
    assert feed.dropped >= 4  # at least one frame skipped between each two takes
    feed.take()
    assert feed.take() == (feed.captured, None)  # a frame is handed out once, never twice


def test_feed_reports_a_camera_that_disappears():
    feed = CameraFeed(FakeCamera(fps=200, unplug_after=3))
    feed.start()
    feed._thread.join(WAIT_S)
    assert not feed.running
    assert feed.captured == 3
    assert "Fake camera stopped delivering frames" in feed.error


def test_feed_turns_a_driver_exception_into_a_message():
    class Broken(FakeCamera):
        def read(self, out=None):
            raise OSError("VIDIOC_DQBUF: No such device")

    feed = CameraFeed(Broken())
    feed.start()
    feed._thread.join(WAIT_S)
    assert feed.error == "Fake camera failed: VIDIOC_DQBUF: No such device"


def test_open_camera_plays_a_video_file_at_its_frame_rate_in_rgb(tmp_path):
    """The window's video files go through the media OpenCVSource, paced like a camera (the pacing
    itself is tested on a fake clock in test_camera_parts), in RGB."""
    cam = open_camera(str(write_video(tmp_path / "clip.avi", 10, fps=50)))
    assert isinstance(cam, PacedSource) and cam.name == "clip.avi" and not cam.live
    cam.open()
    assert cam.fps == 50.0
    frames = []
    buf = None
    while (f := cam.read(buf)) is not None:
        frames.append(f.copy())
        buf = f
    cam.close()
    assert len(frames) == 10
    for i, f in enumerate(frames):  # RGB order restored; MJPG is lossy, so compare on average
        assert f.shape == (96, 128, 3)
        assert np.abs(f.astype(int) - FakeCamera.frame(i).astype(int)).mean() < 8
    webcam = open_camera(0)
    assert not isinstance(webcam, PacedSource) and webcam.live and webcam.name == "Camera 0"


def test_open_camera_errors(tmp_path):
    with pytest.raises(MediaError, match="video not found"):
        open_camera(str(tmp_path / "missing.mp4")).open()
    (tmp_path / "junk.avi").write_bytes(b"not a video" * 10)
    with pytest.raises(MediaError, match="cannot open .*junk.avi: not a video"):
        open_camera(str(tmp_path / "junk.avi")).open()
    with pytest.raises(MediaError, match="no camera found at index 9"):
        open_camera(9).open()


# ---- conversations --------------------------------------------------------------------------

def sample_conversation() -> Conversation:
    rng = np.random.default_rng(0)
    conv = Conversation(model="/models/vila", system="Be brief.")
    conv.add("user", "What is this?\nAnd that?", [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8),
                                                 rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)])
    conv.add("assistant", "A **cat**.\n\n```python\nprint('<hi>')\n```", stats="12 tokens, TTFT 30 ms")
    conv.add("user", "What do you see?", [rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)], live=True)
    conv.add("assistant", "A desk.", live=True)
    return conv


def test_save_and_load_round_trip(tmp_path):
    conv = sample_conversation()
    conv.save(tmp_path / "c")
    back = Conversation.load(tmp_path / "c")
    assert (back.model, back.system) == (conv.model, conv.system)
    for a, b in zip(conv.turns, back.turns, strict=True):
        assert (a.role, a.text, a.time, a.live, a.stats) == (b.role, b.text, b.time, b.live, b.stats)
        assert len(a.images) == len(b.images)
        for x, y in zip(a.images, b.images):
            assert np.array_equal(np.asarray(x), np.asarray(y))  # PNG: lossless
    assert sorted(p.name for p in (tmp_path / "c" / "images").iterdir()) == ["000-0.png", "000-1.png", "002-0.png"]

    conv.turns = conv.turns[2:]  # saving again over the folder leaves no stale images
    conv.save(tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c" / "images").iterdir()) == ["000-0.png"]
    assert len(Conversation.load(tmp_path / "c" / "conversation.json").turns) == 2


def test_load_errors_are_readable(tmp_path):
    with pytest.raises(EdgeVLMError, match="no saved conversation"):
        Conversation.load(tmp_path)
    (tmp_path / "conversation.json").write_text("{not json")
    with pytest.raises(EdgeVLMError, match="is not a saved conversation"):
        Conversation.load(tmp_path)
    (tmp_path / "conversation.json").write_text(json.dumps({"version": 99, "turns": []}))
    with pytest.raises(EdgeVLMError, match="format version 1"):
        Conversation.load(tmp_path)
    sample_conversation().save(tmp_path / "c")
    (tmp_path / "c" / "images" / "000-1.png").unlink()
    with pytest.raises(MediaError, match="image not found"):
        Conversation.load(tmp_path / "c")


def test_export_markdown(tmp_path):
    md = sample_conversation().export_markdown(tmp_path / "notes.md")
    text = md.read_text()
    assert "Model: `/models/vila`" in text and "System prompt: Be brief." in text
    assert text.count("### You") == 2 and "### Assistant (live)" in text
    assert "![image 2](notes_images/000-1.png)" in text and "![image 1](notes_images/002-0.png)" in text
    assert "```python\nprint('<hi>')\n```" in text and "*12 tokens, TTFT 30 ms*" in text
    assert Image.open(tmp_path / "notes_images" / "002-0.png").size == (10, 10)


def test_answers_render_markdown_but_never_raw_html():
    out = markdown_to_html("**bold** <script>x</script> & `<b>`\n\n```\nif a < b:\n```\n\n![x](file:///etc/passwd)")
    assert "<strong>bold</strong>" in out
    assert "<script>" not in out and "&lt;script&gt;" in out
    assert "<code>&lt;b&gt;</code>" in out
    assert "if a &lt; b:" in out and "&amp;lt;" not in out  # code escaped once, not twice
    assert "<img" not in out  # a model cannot make the app load a file
    assert "\x07" not in markdown_to_html("bell\x07")


# ---- errors and CLI --------------------------------------------------------------------------

def test_readable_error_messages():
    import torch

    from edge_vlm.apps.desktop.worker import readable_error

    try:  # a real allocator failure: 4 TiB cannot be had on any test machine
        torch.empty(2**40, dtype=torch.float32)
    except RuntimeError as e:
        cpu_oom = e
    assert readable_error(cpu_oom).startswith("out of memory: ")
    assert readable_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")).startswith(
        "out of memory: ")
    assert readable_error(MediaError("image not found: x.png")) == "image not found: x.png"
    assert readable_error(ValueError("bad\nsecond line")) == "unexpected error (ValueError): bad"


def test_app_subcommand_help(capsys):
    from edge_vlm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["app", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--camera" in out and "--model" in out and "pip install 'edge-vlm[app]'" in out


APP_SMOKE = """
import json, sys, time
from PySide6.QtCore import QSettings, QTimer
from PySide6.QtWidgets import QApplication
from edge_vlm.apps.desktop.window import MainWindow
from edge_vlm.cli import main

model, video, settings = sys.argv[1:4]
app = QApplication.instance() or QApplication(sys.argv[:1])
QSettings.setPath(QSettings.Format.NativeFormat, QSettings.Scope.UserScope, settings)
QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, settings)
seen, deadline = {}, time.monotonic() + 40

def check():
    wins = [w for w in app.topLevelWidgets() if isinstance(w, MainWindow)]
    if wins and wins[0].model is not None and wins[0].feed is not None and wins[0].feed.captured > 0:
        seen["info"] = wins[0].model_panel.info.text()
        wins[0].close()
        app.quit()
    elif time.monotonic() > deadline:
        for w in wins:
            seen["error"] = w.error.text()
            w.close()
        app.quit()

timer = QTimer(interval=20)
timer.timeout.connect(check)
timer.start()
seen["code"] = main(["app", "--model", model, "--camera", video, "--device", "cpu"])
print(json.dumps(seen))
"""


def test_app_command_opens_loads_and_starts_the_camera(tmp_path, tiny_vila):
    """`edge-vlm app --model DIR --camera FILE` end to end; the window is closed once both are up.

    It runs in its own process: once a QApplication's event loop has run and quit, Qt does not
    start event loops in new threads of that process, which would break the other app tests."""
    import subprocess
    import sys

    # Played in real time, 100 frames at 2 fps last 100 s, longer than the script waits (40 s):
    # the clip cannot end before the window is up, however slow the machine.
    video = write_video(tmp_path / "clip.avi", 100, fps=2)
    proc = subprocess.run([sys.executable, "-c", APP_SMOKE, str(tiny_vila), str(video), str(tmp_path / "settings")],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
                          env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["code"] == 0
    assert "error" not in seen, seen
    assert "siglip" in seen["info"]
