"""The camera pipeline end to end: a synthetic video (made here with OpenCV) through
`edge-vlm camera` with the tiny random-weight VILA.

Recorded sources run on the video's own clock (frame / fps), so the trigger tests are exact
without sleeping; live-source behaviour (capture thread, reconnects, signals) uses a source
that plays the same frames and breaks on purpose.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from edge_vlm.apps.camera.outputs import JsonLines
from edge_vlm.apps.camera.pipeline import CameraPipeline
from edge_vlm.apps.camera.triggers import Trigger
from edge_vlm.apps.media.frame_sources import opencv_has_gstreamer
from edge_vlm.cli import main
from tests.fakes import FlakyCamera

FPS = 10
W, H = 64, 48
N_FRAMES = 60  # 6 s of video: dark scene 0-2.9 s, bright scene 3.0-6 s


def scene_frame(i: int, rng: np.random.Generator) -> np.ndarray:
    """Frame i of the synthetic clip: a small moving square on a noisy background; a scene cut at frame 30."""
    base = 40 if i < N_FRAMES // 2 else 210
    img = np.clip(base + rng.integers(-8, 9, (H, W, 3)), 0, 255).astype(np.uint8)
    x = (i * 2) % (W - 8)
    img[20:28, x:x + 8] = (0, 0, 255) if i < N_FRAMES // 2 else (255, 0, 0)
    return img


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's matmuls are microseconds: with 2 intra-op threads on a shared 2-core
    machine, thread hand-offs dominate (measured 8 ms vs 95-230 ms per answer under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    import cv2

    path = tmp_path_factory.mktemp("camera") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
    rng = np.random.default_rng(0)
    for i in range(N_FRAMES):
        writer.write(scene_frame(i, rng))
    writer.release()
    return path


@pytest.fixture(scope="module")
def session(tiny_vila):
    from edge_vlm import ChatSession, load_model

    return ChatSession(load_model(tiny_vila, max_context=256))


def run_cli(capsys, *argv) -> tuple[int, list[dict], str]:
    code = main(["camera", *argv])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def common(tiny_vila, clip):
    return ["--model", str(tiny_vila), "--source", str(clip), "--max-new-tokens", "3", "--max-context", "256"]


# ---- outputs and triggers ---------------------------------------------------------------------


def test_json_lines_have_the_fields(capsys, tiny_vila, clip):
    code, lines, err = run_cli(capsys, *common(tiny_vila, clip), "--interval", "2",
                               "--prompt", "What is in the picture?", "--prompt", "Is there a car?")
    assert code == 0
    assert [(r["frame"], r["prompt"]) for r in lines] == [
        (f, p) for f in (0, 20, 40) for p in ("What is in the picture?", "Is there a car?")]
    for r in lines:
        assert set(r) >= {"timestamp", "stream_time_s", "frame", "prompt", "answer", "latency_s", "trigger", "alert"}
        assert isinstance(r["answer"], str) and r["latency_s"] > 0 and r["alert"] is False
        assert r["stream_time_s"] == pytest.approx(r["frame"] / FPS)
        assert r["timestamp"].endswith("+00:00") and "T" in r["timestamp"]
    assert [r["trigger"] for r in lines[::2]] == ["first", "interval", "interval"]
    assert f"{N_FRAMES} frames checked, 3 answered (6 answers)" in err


def test_interval_fires_on_video_time(capsys, tiny_vila, clip):
    code, lines, _ = run_cli(capsys, *common(tiny_vila, clip), "--interval", "1.5")
    assert code == 0
    assert [r["frame"] for r in lines] == [0, 15, 30, 45]


def test_on_change_fires_at_the_scene_cut_only(capsys, tiny_vila, clip):
    # The moving square and the noise stay under the threshold; the cut at frame 30 does not.
    code, lines, _ = run_cli(capsys, *common(tiny_vila, clip), "--on-change", "0.3")
    assert code == 0
    assert [(r["frame"], r["trigger"]) for r in lines] == [(0, "first"), (30, "change")]
    assert lines[1]["change_score"] > 0.5


def test_max_frames_and_context_frames(capsys, tiny_vila, clip):
    code, lines, _ = run_cli(capsys, *common(tiny_vila, clip), "--interval", "0.5", "--context-frames", "3",
                             "--max-frames", "25")
    assert code == 0
    assert [r["frame"] for r in lines] == [0, 5, 10, 15, 20]
    assert [r["images"] for r in lines] == [1, 2, 3, 3, 3]  # the rolling window fills, then slides


def test_image_folder_source_runs_on_its_own_pace(capsys, tiny_vila, tmp_path):
    import cv2

    rng = np.random.default_rng(3)
    for i in range(6):
        cv2.imwrite(str(tmp_path / f"shot_{i:02d}.jpg"), scene_frame(i * 10, rng))
    code, lines, _ = run_cli(capsys, "--model", str(tiny_vila), "--source", str(tmp_path), "--fps", "2",
                             "--interval", "1", "--max-new-tokens", "2")
    assert code == 0
    assert [(r["frame"], r["stream_time_s"]) for r in lines] == [(0, 0.0), (2, 1.0), (4, 2.0)]


def test_context_that_does_not_fit_is_one_clear_line(capsys, tiny_vila, clip):
    code, lines, err = run_cli(capsys, "--model", str(tiny_vila), "--source", str(clip), "--max-context", "24",
                               "--context-frames", "4", "--interval", "0.1", "--prompt", "Describe the scene.")
    assert code == 1 and err.count("\n") == 1 and "fit in the context" in err


class Hooks(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_alert_fires_once_per_cooldown(capsys, tiny_vila, clip, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)  # local only, started and stopped here
    Hooks.received = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    marks = tmp_path / "alerts.txt"
    cmd = f"sh -c 'echo $EDGE_VLM_FRAME >> {marks}'"
    try:
        # Every answer matches "" ; answers every 0.5 s of video; a 2 s cool-down lets one alert through per 2 s.
        code, lines, err = run_cli(capsys, *common(tiny_vila, clip), "--interval", "0.5", "--alert", "",
                                   "--cooldown", "2", "--alert-cmd", cmd,
                                   "--webhook", f"http://127.0.0.1:{server.server_port}/hook")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert code == 0, err
    assert len(lines) == 12
    alerted = [r["frame"] for r in lines if r["alert"]]
    assert alerted == [0, 20, 40]
    assert [r["frame"] for r in Hooks.received] == alerted  # the webhook got each alert's JSON line
    assert Hooks.received[0]["answer"] == lines[0]["answer"]
    assert marks.read_text().split() == ["0", "20", "40"]  # the command ran once per alert


def test_annotated_video_is_readable(capsys, tiny_vila, clip, tmp_path):
    import cv2

    out = tmp_path / "annotated.mp4"
    code, lines, _ = run_cli(capsys, *common(tiny_vila, clip), "--interval", "3", "--output", str(out))
    assert code == 0 and lines
    cap = cv2.VideoCapture(str(out))
    frames = []
    while (ok_frame := cap.read())[0]:
        frames.append(ok_frame[1])
    cap.release()
    assert len(frames) == N_FRAMES and frames[0].shape == (H, W, 3)
    src = cv2.VideoCapture(str(clip))
    original = [src.read()[1] for _ in range(N_FRAMES)]
    src.release()
    # The answer band darkens the bottom rows and leaves the top alone (up to codec error).
    diff = lambda a, b: np.abs(a.astype(int) - b.astype(int)).mean()  # noqa: E731
    assert diff(frames[40][-6:], original[40][-6:]) > 40
    assert diff(frames[40][:10], original[40][:10]) < 12


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_source, message", [
    (lambda d: d / "missing.mp4", "video not found"),
    (lambda d: (d / "notes.mp4").write_text("hello") and d / "notes.mp4", "cannot open"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "no images in"),
    (lambda d: "/dev/video97", "camera not found"),
])
def test_bad_source_is_one_clear_line(capsys, tiny_vila, tmp_path, make_source, message):
    source = make_source(tmp_path)
    code = main(["camera", "--model", str(tiny_vila), "--source", str(source), "--backend", "opencv"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("edge-vlm: error: ") and message in err


def test_bad_options_are_one_clear_line(capsys, tiny_vila, clip, tmp_path):
    for extra, message in [(["--alert-cmd", "true"], "need --alert"), (["--on-change", "3"], "between 0 and 1"),
                           (["--output", str(tmp_path / "x.gif")], "use one of"),
                           (["--alert", "(bad"], "not a valid regular expression")] + (
                           [] if opencv_has_gstreamer() else [(["--output", "udp://127.0.0.1:5000"], "needs OpenCV")]):
        code, lines, err = run_cli(capsys, *common(tiny_vila, clip), *extra)
        assert code == 1 and not lines and err.count("\n") == 1 and message in err, (extra, err)


# ---- live sources: reconnects, memory, signals -----------------------------------------------------


class Sink:
    """A JSON-lines stream that keeps nothing (so the soak test measures the pipeline, not its log)."""

    def __init__(self, on_line=None):
        self.lines, self.on_line = 0, on_line

    def write(self, record: dict) -> None:
        self.lines += 1
        if self.on_line:
            self.on_line(self.lines)

    stream = property(lambda self: self)

    def flush(self) -> None:
        pass


def test_live_source_that_drops_reconnects_with_backoff(session, clip):
    cam = FlakyCamera(clip, drop_after=12, refusals=2)
    cam.open()
    seen = []

    class Recorder(Sink):
        def write(self, record):
            seen.append(record["frame"])

    pipe = CameraPipeline(session=session, source=cam, prompts=["What?"], trigger=Trigger(interval=0),
                          json_out=Recorder(), max_frames=25, backoff=(0.01, 0.04), log=lambda m: None)
    stats = pipe.run()
    assert stats.reconnects == 1 and cam.opens == 4  # first open, two refused, one good
    assert pipe._capture.delays == [0.01, 0.02, 0.04]  # exponential back-off up to the ceiling
    assert cam.delivered > 12 and len(seen) == 25  # frames kept coming after the drop
    assert seen == sorted(seen) and seen[-1] > 12


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class LockstepCamera(FlakyCamera):
    """The clip as an endless live camera that runs exactly two frames ahead of the pipeline.

    Frame k may be delivered once the pipeline has seen k // 2 frames, and `LockstepTrigger`
    holds the pipeline on each frame until the next two are in its buffer, so it always takes
    the newer one and the other is dropped: the pipeline sees frames 0, 2, 4, ... on any
    machine, at any speed. The stream clock is the camera's own (frame k is at (k + 1) / 64 s,
    exact in binary), so the interval trigger counts frames, not wall time.
    """

    PERIOD = 1 / 64

    def __init__(self, clip: Path, timeout: float = 60.0):
        super().__init__(clip, rate=None)
        self.put = 0  # frames the capture thread has put in the buffer (it reads again only after putting)
        self.cond = threading.Condition()
        self.pipe: CameraPipeline | None = None
        self.timeout = timeout

    def clock(self) -> float:
        return self.delivered * self.PERIOD

    def _wait(self, ready) -> bool:
        """Wait (holding cond) until ready(); False if the pipeline stopped; fail after `timeout`."""
        deadline = time.monotonic() + self.timeout
        while not ready():
            if self.pipe.stop.is_set():
                return False
            assert time.monotonic() < deadline, "lockstep stalled"
            self.cond.wait(0.05)
        return True

    def read(self, out=None):
        with self.cond:
            self.put = self.delivered
            self.cond.notify_all()
            if not self._wait(lambda: self.delivered < 2 * self.pipe.stats.frames_seen + 1):
                return None  # stopped: the capture thread ends
        return super().read(out)


class LockstepTrigger(Trigger):
    def __init__(self, cam: LockstepCamera, **kw):
        super().__init__(**kw)
        self.cam = cam

    def check(self, image, now):
        cam = self.cam
        with cam.cond:  # the pipeline has just seen one more frame: let the camera deliver two more
            cam.cond.notify_all()
            cam._wait(lambda: cam.put >= 2 * cam.pipe.stats.frames_seen + 1)
        return super().check(image, now)


def test_soak_memory_stays_flat(session, tmp_path):
    """70 answers, 346 frames checked and 693 captured, on a live 480x360 camera: between answer 30
    and answer 70, RSS, Python objects and allocated blocks stay flat.

    What the bounds catch: one leaked frame per answer adds 518 KB x 40 = 20 MB of RSS (bound
    8 MB); a chat history that is never reset, or one record kept per answer, adds dicts and
    lists (bound: 50 objects); a new KV cache per frame adds ~0.5 MB each. Measured here: RSS
    +0-2.5 MB, 0 objects, about +5 small blocks per answer (inside torch).
    The counts follow from the lockstep camera (every other frame seen) and the interval of
    10 frame periods: answers at frames 0, 10, ..., 690, whatever the machine's speed.
    """
    import gc
    import sys

    import cv2

    big = tmp_path / "big.avi"
    writer = cv2.VideoWriter(str(big), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (480, 360))
    rng = np.random.default_rng(1)
    for i in range(N_FRAMES):
        writer.write(cv2.resize(scene_frame(i, rng), (480, 360)))
    writer.release()
    samples: dict[int, tuple[int, int, int]] = {}
    answered = np.full(80, -1)  # the frame of each answer, preallocated: keeping them adds no objects

    class Probe(Sink):  # sample memory after answer 30 (warm: allocator pools filled) and answer 70, then stop
        def write(self, record):
            super().write(record)
            answered[self.lines - 1] = record["frame"]
            if self.lines in (30, 70):
                gc.collect()
                samples[pipe.stats.frames_seen] = (rss_bytes(), len(gc.get_objects()), sys.getallocatedblocks())
            if self.lines == 70:
                pipe.stop.set()

    cam = LockstepCamera(big)
    cam.open()
    cache = session.engine.cache
    # Scene cuts (every 30 frames) fall on interval answers, so the change trigger never adds one.
    pipe = CameraPipeline(session=session, source=cam, prompts=["Describe."],
                          trigger=LockstepTrigger(cam, interval=10 * cam.PERIOD, change_threshold=0.3),
                          json_out=Probe(), clock=cam.clock, log=lambda m: None)
    cam.pipe = pipe
    stats = pipe.run()
    (n0, (rss0, obj0, blk0)), (n1, (rss1, obj1, blk1)) = samples.items()
    print(f"soak frames {n0}->{n1}: RSS {rss1 - rss0:+d} B, objects {obj1 - obj0:+d}, blocks {blk1 - blk0:+d}; "
          f"{stats.summary()}")
    assert answered[:70].tolist() == list(range(0, 700, 10)) and answered[70] == -1
    assert (n0, n1) == (146, 346)  # frames seen at answers 30 and 70: frames 0, 2, ..., 690
    assert stats.answers == 70 and stats.frames_seen == 346 and stats.dropped == 347  # 693 captured
    assert rss1 - rss0 < 8 * 2**20
    assert obj1 - obj0 < 50
    assert blk1 - blk0 < 2000
    assert session.engine.cache is cache and len(session.messages) == 2  # one session, reset per question


def test_sigterm_stops_cleanly_and_flushes(capsys, tiny_vila, tmp_path, monkeypatch):
    """SIGTERM while a --realtime file plays like a camera: the answer in progress is finished and
    written, the video is finalised, and our own SIGTERM handler is back afterwards.

    The signal is sent when the second JSON line is written, not after some wall time, and the
    clip plays for a minute: stopping early cannot be mistaken for the clip ending."""
    import cv2

    long_clip = tmp_path / "long.avi"
    writer = cv2.VideoWriter(str(long_clip), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (W, H))
    rng = np.random.default_rng(0)
    frames = [scene_frame(i, rng) for i in range(N_FRAMES)]
    for i in range(600):  # 60 s at 10 fps: --realtime can only take longer than that, never less
        writer.write(frames[i % N_FRAMES])
    writer.release()
    out = tmp_path / "live.avi"
    strays = []
    ours = lambda signum, frame: strays.append(signum)  # noqa: E731 - never let a late signal kill pytest
    previous = signal.signal(signal.SIGTERM, ours)
    write = JsonLines.write

    def write_then_sigterm(self, record):
        write(self, record)
        if self.lines == 2:
            assert signal.getsignal(signal.SIGTERM) is not ours  # the camera command's handler is in place
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(JsonLines, "write", write_then_sigterm)
    try:
        code, lines, err = run_cli(capsys, "--model", str(tiny_vila), "--source", str(long_clip),
                                   "--max-new-tokens", "3", "--max-context", "256", "--realtime",
                                   "--interval", "0.2", "--output", str(out))
    finally:
        restored = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)
    assert code == 0, err
    assert "SIGTERM: stopping" in err and "2 answered (2 answers)" in err
    assert len(lines) == 2 and all("answer" in r for r in lines)  # complete JSON, nothing after the stop
    assert lines[1]["stream_time_s"] >= lines[0]["stream_time_s"] + 0.2  # on the wall clock, like a camera
    cap = cv2.VideoCapture(str(out))  # the video was finalised, so it is readable
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, frame = cap.read()
    cap.release()
    # Every captured frame was written, up to and past the last one answered; far from all 600.
    assert ok and frame.shape == (H, W, 3) and lines[1]["frame"] < n < 600
    assert restored is ours and not strays  # our handler was put back; the signal went to the camera's
