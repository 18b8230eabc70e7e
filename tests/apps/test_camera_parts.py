"""Unit tests of the camera pipeline's parts: source parsing, GStreamer strings, the latest-frame
buffer, the scene-change score, triggers on a fake clock, and alert matching/cool-down."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from edge_vlm.apps.camera.alerts import Alerter, AlertRule
from edge_vlm.apps.camera.triggers import Trigger
from edge_vlm.errors import EdgeVLMError, MediaError
from edge_vlm.apps.media.frame_sources import ImageFolderSource, SourceSpec, open_source, parse_source
from edge_vlm.apps.media.gstreamer import sink_pipeline, source_pipeline
from edge_vlm.apps.media.latest_frame import LatestFrameBuffer
from edge_vlm.apps.media.scene_change import SceneChangeDetector, change_score

# ---- sources -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, kind, location, name", [
    ("csi://0", "csi", "0", "csi://0"), ("csi://1", "csi", "1", "csi://1"), ("csi", "csi", "0", "csi://0"),
    ("csi:2", "csi", "2", "csi://2"), ("/dev/video2", "v4l2", "/dev/video2", "/dev/video2"),
    ("0", "index", "0", "Camera 0"), ("3", "index", "3", "Camera 3"), ("03", "index", "3", "Camera 3"),
    ("rtsp://10.0.0.5:8554/cam", "rtsp", "rtsp://10.0.0.5:8554/cam", "rtsp://10.0.0.5:8554/cam"),
    ("videos/clip.mp4", "file", "videos/clip.mp4", "clip.mp4"),
])
def test_parse_source(text, kind, location, name):
    spec = parse_source(text)
    assert (spec.kind, spec.location, spec.name) == (kind, location, name)
    assert spec.live == (kind in ("index", "csi", "v4l2", "rtsp"))


def test_index_camera_on_and_off_linux(monkeypatch):
    """A webcam by number: on Linux the /dev/videoN device (V4L2 or a GStreamer v4l2src); elsewhere
    OpenCV opens the number with the OS's own camera API, even where OpenCV has GStreamer."""
    import cv2

    import edge_vlm.apps.media.frame_sources as fs

    opened = []

    class NoCamera:  # records how OpenCV was asked, and finds nothing there
        def __init__(self, *args):
            opened.append(args)

        def isOpened(self):  # noqa: N802 - OpenCV's naming
            return False

        def release(self):
            pass

    monkeypatch.setattr(cv2, "VideoCapture", NoCamera)
    monkeypatch.setattr(fs, "opencv_has_gstreamer", lambda: True)
    monkeypatch.setattr(fs, "is_jetson", lambda: False)
    monkeypatch.setattr(fs, "on_linux", lambda: False)
    src = open_source("1")
    assert (src.backend, src.name, src.live, src.describe()) == ("opencv", "Camera 1", True, "1")
    with pytest.raises(MediaError, match=r"no camera found at index 1 \(is one plugged in"):
        src.open()
    assert opened == [(1,)]  # the number itself, with no Linux-only API

    monkeypatch.setattr(fs, "on_linux", lambda: True)
    src = open_source("1")
    assert src.backend == "gstreamer"
    assert src.describe() == source_pipeline("v4l2", "/dev/video1", jetson=False)
    src = open_source("1", backend="opencv")
    assert src.describe() == "/dev/video1"
    if not Path("/dev/video1").exists():
        with pytest.raises(MediaError, match="no camera found at index 1: /dev/video1 does not exist"):
            src.open()


def test_parse_source_folder_and_empty(tmp_path):
    assert parse_source(str(tmp_path)) == SourceSpec("folder", str(tmp_path))
    with pytest.raises(MediaError):
        parse_source("  ")


def test_csi_needs_gstreamer_opencv():
    # pip's opencv-python-headless has no GStreamer: asking for CSI must say so in one line.
    with pytest.raises(MediaError, match="CSI cameras need OpenCV's GStreamer backend"):
        open_source("csi://0", backend="opencv")


def test_gstreamer_backend_uses_the_pipeline_builder(monkeypatch):
    import edge_vlm.apps.media.frame_sources as fs

    monkeypatch.setattr(fs, "opencv_has_gstreamer", lambda: False)
    with pytest.raises(MediaError, match="--backend gstreamer needs OpenCV's GStreamer backend"):
        open_source("rtsp://cam/x", backend="gstreamer")
    monkeypatch.setattr(fs, "opencv_has_gstreamer", lambda: True)
    monkeypatch.setattr(fs, "is_jetson", lambda: True)
    src = open_source("rtsp://cam/x", backend="auto", codec="h265", width=640, height=480)
    assert src.backend == "gstreamer"
    assert src.describe() == source_pipeline("rtsp", "rtsp://cam/x", jetson=True, codec="h265", width=640, height=480)
    assert "nvv4l2decoder" in src.describe()
    assert open_source("csi://1", flip=2).describe().startswith("nvarguscamerasrc sensor-id=1 ")


def test_image_folder_reads_in_name_order_in_rgb_and_skips_junk(tmp_path):
    from PIL import Image

    for i, v in [(2, 200), (0, 10), (1, 100)]:
        Image.fromarray(np.full((8, 12, 3), (v, 0, 255 - v), np.uint8)).save(tmp_path / f"f{i}.png")
    Image.fromarray(np.full((8, 12, 3), 50, np.uint8)).save(tmp_path / "f3.gif")  # every preprocess suffix
    (tmp_path / "f1b.png").write_bytes(b"not a png")  # unreadable: skipped, not fatal
    (tmp_path / "notes.txt").write_text("ignored")
    src = ImageFolderSource(tmp_path, fps=2)
    src.open()
    values = []
    buf = None
    while (frame := src.read(buf)) is not None:
        assert buf is None or frame is buf  # read into the caller's array once the size is known
        values.append(tuple(int(c) for c in frame[0, 0]))
        buf = frame
    assert values == [(10, 0, 245), (100, 0, 155), (200, 0, 55), (50, 50, 50)]  # red first: RGB
    assert src.fps == 2.0 and src.name == tmp_path.name


def test_paced_source_delivers_at_the_frame_rate_without_catching_up():
    """A recorded source played like a camera: one frame every 1/fps on the (fake) clock, and after
    a stall it carries on from now instead of rushing out the frames it was late for."""
    from edge_vlm.apps.media.frame_sources import FrameSource, PacedSource

    class Counter(FrameSource):
        fps = 4.0
        name = "counter"

        def __init__(self):
            self.n = 0

        def read(self, out=None):
            self.n += 1
            return np.full((2, 2, 3), self.n, np.uint8)

    now = [100.0]
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    src = PacedSource(Counter(), clock=lambda: now[0], sleep=sleep)
    src.open()
    assert (src.fps, src.name, src.live) == (4.0, "counter", False)
    got = [int(src.read()[0, 0, 0]) for _ in range(4)]
    assert got == [1, 2, 3, 4] and slept == [0.25, 0.25, 0.25]  # the first frame at once
    now[0] += 2.0  # the consumer stalled for 8 frame times
    slept.clear()
    src.read()
    src.read()
    assert slept == [0.25]  # late: no wait, then the normal pace (no burst of 8)
    assert PacedSource(Counter(), fps=10).fps == 10.0


# ---- GStreamer pipeline strings --------------------------------------------------------------


def test_csi_pipeline_on_jetson():
    p = source_pipeline("csi", "1", jetson=True, width=1280, height=720, fps=30, flip=2)
    assert p.startswith("nvarguscamerasrc sensor-id=1 ! video/x-raw(memory:NVMM),width=1280,height=720,"
                        "framerate=30/1,format=NV12 ! nvvidconv flip-method=2")
    assert p.endswith("video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false")
    with pytest.raises(ValueError):
        source_pipeline("csi", "0", jetson=False)


@pytest.mark.parametrize("codec", ["h264", "h265"])
def test_rtsp_pipeline_hardware_decode_only_on_jetson(codec):
    jet = source_pipeline("rtsp", "rtsp://cam/x", jetson=True, codec=codec)
    pc = source_pipeline("rtsp", "rtsp://cam/x", jetson=False, codec=codec)
    assert f"rtp{codec}depay ! {codec}parse ! nvv4l2decoder ! nvvidconv" in jet
    assert "nvv4l2decoder" not in pc and f"avdec_{codec}" in pc
    for p in (jet, pc):
        assert 'rtspsrc location="rtsp://cam/x" latency=200' in p
        assert p.endswith("appsink drop=true max-buffers=1 sync=false")  # live: never queue stale frames
    with pytest.raises(ValueError):
        source_pipeline("rtsp", "rtsp://cam/x", jetson=True, codec="mjpeg")


def test_file_pipeline_reads_every_frame_and_quotes_paths():
    jet = source_pipeline("file", '/data/my "clip" ! 1.mp4', jetson=True)
    assert jet.startswith(r'filesrc location="/data/my \"clip\" ! 1.mp4" ! parsebin ! nvv4l2decoder')
    pc = source_pipeline("file", "/data/a.mp4", jetson=False)
    assert "decodebin" in pc and "nvv4l2" not in pc and "nvvidconv" not in pc
    assert jet.endswith("appsink sync=false") and "drop=true" not in jet  # a file must not drop frames


def test_v4l2_pipeline():
    p = source_pipeline("v4l2", "/dev/video1", jetson=False, width=640, height=480, fps=15)
    assert p.startswith('v4l2src device="/dev/video1" ! video/x-raw,width=640,height=480,framerate=15/1 ! ')
    assert "nvvidconv" in source_pipeline("v4l2", "/dev/video1", jetson=True)
    with pytest.raises(ValueError):
        source_pipeline("folder", "/x", jetson=False)


def test_sink_pipelines():
    udp = sink_pipeline("udp://192.168.1.10:5000", jetson=False, bitrate_kbps=2000)
    assert udp.startswith("appsrc is-live=true")
    assert "x264enc tune=zerolatency" in udp and "bitrate=2000 " in udp
    assert udp.endswith("rtph264pay config-interval=1 pt=96 ! udpsink host=192.168.1.10 port=5000 sync=false")
    jet = sink_pipeline("rtsp://server:8554/out", jetson=True, bitrate_kbps=2000)
    assert "nvv4l2h264enc bitrate=2000000" in jet and "x264enc" not in jet  # nvv4l2h264enc counts bits/s
    assert jet.endswith('rtspclientsink location="rtsp://server:8554/out"')
    for bad in ("udp://nohost", "http://x/y"):
        with pytest.raises(ValueError):
            sink_pipeline(bad, jetson=False)


# ---- latest-frame buffer ----------------------------------------------------------------------


def test_latest_frame_buffer_keeps_newest_and_counts_drops():
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (6, 8, 3), dtype=np.uint8) for _ in range(5)]
    buf = LatestFrameBuffer(capacity=1)
    assert buf.latest(timeout=0) is None
    for i, f in enumerate(frames[:3]):
        assert buf.put(f, timestamp=float(i)) == i
    got = buf.latest()
    assert got.index == 2 and got.timestamp == 2.0 and np.array_equal(got.image, frames[2])
    assert buf.dropped == 2  # frames 0 and 1 were overwritten unseen
    frames[2][:] = 0  # the buffer holds a copy, not the caller's array
    assert buf.latest(after=1).image.sum() > 0
    assert buf.latest(after=2, timeout=0.01) is None  # nothing newer: times out
    out = got.image
    buf.put(frames[3])
    again = buf.latest(after=2, out=out)
    assert again.image is out and np.array_equal(out, frames[3])  # storage reused
    buf.close()
    assert buf.latest(after=3) is None  # closed and nothing newer: no wait


def test_latest_frame_buffer_reuses_slot_storage():
    buf = LatestFrameBuffer(capacity=2)
    a = np.ones((4, 4, 3), np.uint8)
    buf.put(a)
    buf.put(a * 2)
    slots = [id(s) for s in buf._slots]
    for k in range(10):
        buf.put(a * k)
    assert [id(s) for s in buf._slots] == slots
    assert buf.latest().image[0, 0, 0] == 9


def test_latest_frame_buffer_wakes_a_waiting_consumer():
    buf = LatestFrameBuffer()
    got = []
    t = threading.Thread(target=lambda: got.append(buf.latest(timeout=5)))
    t.start()
    buf.put(np.full((2, 2, 3), 7, np.uint8))
    t.join(5)
    assert got and got[0].image[0, 0, 0] == 7


# ---- scene change ------------------------------------------------------------------------------


def test_change_score_scale_and_noise_tolerance():
    rng = np.random.default_rng(1)
    base = rng.integers(60, 200, (120, 160, 3), dtype=np.uint8)
    noisy = np.clip(base.astype(int) + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)
    black, white = np.zeros_like(base), np.full_like(base, 255)
    assert change_score(black, white) == pytest.approx(1.0)
    assert change_score(base, base) == 0.0
    assert change_score(base, noisy) < 0.01  # sensor noise averages out in the thumbnail
    person = base.copy()
    person[30:110, 60:100] = 255  # a bright figure covering ~17% of the frame
    assert 0.05 < change_score(base, person) < 0.5


def test_detector_compares_with_the_reference_not_the_previous_frame():
    det = SceneChangeDetector(threshold=0.1)
    frames = [np.full((24, 32, 3), 20 + 10 * i, np.uint8) for i in range(6)]  # a slow fade
    assert det.changed(frames[0]) == (True, 1.0)  # no reference yet
    det.set_reference(frames[0])
    scores = [det.score(f) for f in frames[1:]]
    assert all(b > a for a, b in zip(scores, scores[1:]))  # the drift accumulates
    assert not det.changed(frames[1])[0] and det.changed(frames[5])[0]


# ---- triggers on a fake clock --------------------------------------------------------------------


def test_interval_trigger_on_fake_clock():
    trig = Trigger(interval=2.0)
    img = np.zeros((8, 8, 3), np.uint8)
    fired = []
    for step in range(21):  # 0.0, 0.5, ..., 10.0 s
        now = step * 0.5
        reason, _ = trig.check(img, now)
        if reason:
            trig.fired(img, now)
            fired.append((now, reason))
    assert fired == [(0.0, "first"), (2.0, "interval"), (4.0, "interval"), (6.0, "interval"), (8.0, "interval"),
                     (10.0, "interval")]


def test_change_trigger_with_and_without_interval():
    dark, bright = np.full((24, 32, 3), 10, np.uint8), np.full((24, 32, 3), 240, np.uint8)
    seq = [dark] * 5 + [bright] * 5 + [dark] * 2

    def fired(trig):
        """(frame index, reason) of every frame the trigger fires on, one frame a second."""
        out = []
        for i, img in enumerate(seq):
            reason, _ = trig.check(img, float(i))
            if reason:
                trig.fired(img, float(i))
                out.append((i, reason))
        return out

    assert fired(Trigger(interval=None, change_threshold=0.2)) == [(0, "first"), (5, "change"), (10, "change")]
    # with an interval too: a heartbeat even when nothing moves
    assert fired(Trigger(interval=3.0, change_threshold=0.2)) == [
        (0, "first"), (3, "interval"), (5, "change"), (8, "interval"), (10, "change")]
    with pytest.raises(ValueError):
        Trigger(interval=None, change_threshold=None)


# ---- alerts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, answer, expected", [
    ("yes", "Yes, a person is at the door.", True), ("yes", "  yes", True), ("yes", "No.", False),
    ("yes", "Yesterday it rained", False), ("no", "No, nobody.", True), ("no", "There is no one", False),
    ("person|man|woman", "A Woman walks by", True), ("person", "an empty street", False),
    (r"\d+ cars", "I count 3 cars", True),
])
def test_alert_rule(pattern, answer, expected):
    assert AlertRule(pattern).matches(answer) is expected


def test_alert_rule_bad_regex_is_one_line_error():
    with pytest.raises(EdgeVLMError, match="not a valid regular expression"):
        AlertRule("(unclosed")


def test_alerter_cooldown_on_fake_clock():
    al = Alerter(AlertRule("yes"), cooldown=10.0)
    rec = lambda a: {"answer": a, "prompt": "p", "frame": 0, "timestamp": "t"}  # noqa: E731
    fired = [t for t in range(0, 35, 1) if al.maybe_fire(rec("yes" if t != 20 else "no"), float(t))]
    # 20 s would be due but that answer is "no"; the next match (21 s) fires and restarts the cool-down
    assert fired == [0, 10, 21, 31]
    assert al.fired == 4
    al.close()
