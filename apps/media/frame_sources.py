"""Where frames come from: a webcam by index, CSI camera, V4L2 device, RTSP stream, video file, image folder.

Both apps read every source through one small interface (`FrameSource`: open, read, close,
plus `live`, `fps` and `name`), so neither cares what is on the other end. Every source
delivers RGB, the order the model, PIL and Qt expect; only OpenCV's video writer wants BGR
(see apps/camera/outputs.py). A *live* source (camera, stream) is read as fast as it
delivers and may drop and reconnect; a *recorded* source (file, folder) is read frame by
frame, in order, and simply ends, with timestamps taken from its own frame rate.
`PacedSource` plays a recorded source at that frame rate, as if it were a camera.

OpenCV's GStreamer backend is used where OpenCV was built with it (JetPack's OpenCV is),
so a Jetson decodes in hardware; otherwise OpenCV's plain backends (V4L2, FFmpeg, and the
OS's own camera API for index cameras) read the same inputs, except CSI cameras, which
only exist through GStreamer.
"""

from __future__ import annotations

import functools
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_vlm.errors import MediaError
from edge_vlm.imaging.preprocess import IMAGE_SUFFIXES, load_image

from .gstreamer import source_pipeline

LIVE_KINDS = ("index", "csi", "v4l2", "rtsp")
_IN_USE = "is one plugged in and not used by another program?"


@dataclass(frozen=True)
class SourceSpec:
    """A parsed --source argument."""

    kind: str  # index | csi | v4l2 | rtsp | file | folder
    location: str  # camera index, sensor id, device path, URL or filesystem path

    @property
    def live(self) -> bool:
        return self.kind in LIVE_KINDS

    @property
    def name(self) -> str:
        """How the source is called in messages: 'Camera 0', 'clip.mp4', the device or the URL."""
        if self.kind == "index":
            return f"Camera {self.location}"
        return Path(self.location).name if self.kind in ("file", "folder") else str(self)

    def __str__(self) -> str:
        return f"csi://{self.location}" if self.kind == "csi" else self.location


def parse_source(text: str) -> SourceSpec:
    """'0' (a webcam by index, any OS), 'csi://0', '/dev/video0', 'rtsp://...', a video file or a folder."""
    text = text.strip()
    if not text:
        raise MediaError("empty --source: give a camera (0, csi://0, /dev/video0), an rtsp:// URL, a video "
                         "or a folder")
    m = re.fullmatch(r"csi(?::(?://)?(\d+))?", text)
    if m:
        return SourceSpec("csi", m.group(1) or "0")
    if text.isdigit():
        return SourceSpec("index", str(int(text)))
    if text.startswith("/dev/video"):
        return SourceSpec("v4l2", text)
    if re.match(r"(rtsps?|https?)://", text):
        return SourceSpec("rtsp", text)
    if Path(text).is_dir():
        return SourceSpec("folder", text)
    return SourceSpec("file", text)


@functools.cache
def is_jetson() -> bool:
    """True on an NVIDIA Jetson (L4T): the hardware video blocks are there."""
    if Path("/etc/nv_tegra_release").exists():
        return True
    try:
        return "nvidia jetson" in Path("/proc/device-tree/model").read_text(errors="ignore").lower()
    except OSError:
        return False


def on_linux() -> bool:
    """Linux names cameras /dev/videoN (V4L2); other systems only number them."""
    return sys.platform.startswith("linux")


@functools.cache
def opencv_has_gstreamer() -> bool:
    import cv2

    return bool(re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()))


def _into(out: np.ndarray | None, image: np.ndarray) -> np.ndarray:
    """`image` copied into `out` when the shapes match (storage reused frame after frame), else a copy
    the caller owns (and may hand back as `out`)."""
    if out is None or out.shape != image.shape or out.dtype != image.dtype:
        out = np.empty_like(image)
    np.copyto(out, image)
    return out


class FrameSource:
    """The interface every source implements, for the camera pipeline and the desktop app alike."""

    name: str = "source"  # for messages: "Camera 0", "clip.mp4", "rtsp://..."
    live: bool = False  # True: camera/stream (drop frames, reconnect); False: file/folder (in order, ends)
    fps: float = 0.0  # the source's frame rate when it says (recorded sources use it for timestamps)

    def open(self) -> None:
        """Connect; raise MediaError with one readable line if the source cannot be opened."""

    def read(self, out: np.ndarray | None = None) -> np.ndarray | None:
        """The next HxWx3 uint8 RGB frame (into `out` when its size matches), or None at the end or on a drop.

        Blocks until the frame is there, as a camera does; the caller may hand the returned
        array back as `out` next time, so no frame allocates.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release the device/file (safe to call twice, and before open)."""


class OpenCVSource(FrameSource):
    """A camera, stream or video file read by cv2.VideoCapture (GStreamer or plain backend)."""

    def __init__(self, spec: SourceSpec, width: int | None = None, height: int | None = None,
                 fps: float | None = None, backend: str = "auto", codec: str = "h264", flip: int = 0):
        if backend not in ("auto", "gstreamer", "opencv"):
            raise ValueError(f"unknown backend {backend!r}")
        self.spec, self.width, self.height, self.requested_fps = spec, width, height, fps
        self.codec, self.flip = codec, flip
        self.live, self.name = spec.live, spec.name
        # An index camera goes through GStreamer only on Linux, where the index is a /dev/videoN
        # device; elsewhere OpenCV opens it with the OS's own camera API.
        plain = spec.kind == "index" and not on_linux()
        auto = "gstreamer" if opencv_has_gstreamer() and not plain else "opencv"
        self.backend = auto if backend == "auto" else backend
        if plain and self.backend == "gstreamer":
            raise MediaError(f"{spec.name}: a camera by number goes through GStreamer only on Linux; "
                             f"use --backend opencv")
        no_gst = self.backend != "gstreamer" or not opencv_has_gstreamer()
        if no_gst and (spec.kind == "csi" or backend == "gstreamer"):
            need = "CSI cameras need" if spec.kind == "csi" else "--backend gstreamer needs"
            raise MediaError(f"{spec}: {need} OpenCV's GStreamer backend (Ubuntu/JetPack python3-opencv has it, "
                             f"pip's opencv-python-headless does not)")
        self._cap = None
        self._bgr: np.ndarray | None = None  # what OpenCV decodes into, reused

    @property
    def _device(self) -> str:
        """The V4L2 device of a camera given by index or path (Linux)."""
        return f"/dev/video{self.spec.location}" if self.spec.kind == "index" else self.spec.location

    def describe(self) -> str:
        """The pipeline string or device handed to OpenCV (for logs and --help debugging)."""
        kind, location = self.spec.kind, self.spec.location
        if kind == "index" and on_linux():
            kind, location = "v4l2", self._device
        if self.backend == "gstreamer":
            return source_pipeline(kind, location, jetson=is_jetson(), width=self.width,
                                   height=self.height, fps=self.requested_fps, flip=self.flip, codec=self.codec)
        return location

    def open(self) -> None:
        import cv2

        self.close()
        kind, where = self.spec.kind, str(self.spec)
        linux = on_linux()
        if kind == "file" and not Path(self.spec.location).is_file():
            raise MediaError(f"video not found: {where}")
        if kind == "v4l2" and self.backend == "opencv" and not Path(self.spec.location).exists():
            raise MediaError(f"camera not found: {where} does not exist "
                             f"(is it plugged in? see `v4l2-ctl --list-devices`)")
        if kind == "index" and linux and not Path(self._device).exists():
            raise MediaError(f"no camera found at index {self.spec.location}: {self._device} does not exist "
                             f"({_IN_USE} see `v4l2-ctl --list-devices`)")
        if self.backend == "gstreamer":
            cap = cv2.VideoCapture(self.describe(), cv2.CAP_GSTREAMER)
        elif kind in ("index", "v4l2"):
            index = int(re.sub(r"\D", "", self._device) or 0)
            cap = cv2.VideoCapture(index, cv2.CAP_V4L2) if linux else cv2.VideoCapture(index)
        else:
            cap = cv2.VideoCapture(self.spec.location)
        if not cap.isOpened():
            cap.release()
            if kind == "index":
                raise MediaError(f"no camera found at index {self.spec.location} ({_IN_USE})")
            what = {"file": "not a video or an unsupported codec", "rtsp": "stream unreachable or refused",
                    "v4l2": "device busy or not a camera", "csi": "camera not detected by nvargus-daemon"}
            how = f" (GStreamer pipeline: {self.describe()})" if self.backend == "gstreamer" else ""
            raise MediaError(f"cannot open {where}: {what[kind]}{how}")
        if self.backend == "opencv" and self.live:
            for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, self.width), (cv2.CAP_PROP_FRAME_HEIGHT, self.height),
                                (cv2.CAP_PROP_FPS, self.requested_fps)):
                if value:
                    cap.set(prop, value)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # V4L2: keep the driver queue short, we want the newest frame
        self.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) or float(self.requested_fps or 0.0)
        self._cap = cap

    def read(self, out: np.ndarray | None = None) -> np.ndarray | None:
        import cv2

        if self._cap is None:
            return None
        ok, bgr = self._cap.read(self._bgr) if self._bgr is not None else self._cap.read()
        if not ok or bgr is None or not bgr.size:
            return None
        self._bgr = bgr
        if out is None or out.shape != bgr.shape:
            out = np.empty_like(bgr)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=out)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class ImageFolderSource(FrameSource):
    """The images of a folder, in name order, as a recorded stream at `fps` frames a second."""

    def __init__(self, folder: str | Path, fps: float | None = None):
        self.folder = Path(folder)
        self.name = self.folder.name
        self.fps = float(fps or 1.0)
        self._files: list[Path] = []
        self._next = 0

    def open(self) -> None:
        if not self.folder.is_dir():
            raise MediaError(f"image folder not found: {self.folder}")
        self._files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._files:
            raise MediaError(f"no images in {self.folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        self._next = 0

    def read(self, out: np.ndarray | None = None) -> np.ndarray | None:
        while self._next < len(self._files):
            path = self._files[self._next]
            self._next += 1
            try:
                image = np.asarray(load_image(path))
            except MediaError as e:  # an unreadable file (corrupt, a decompression bomb) is skipped, not fatal
                print(f"edge-vlm: skipping {path.name}: {e}", file=sys.stderr)
                continue
            return _into(out, image)
        return None


class PacedSource(FrameSource):
    """A recorded source played at its own frame rate, the way a camera would deliver it.

    For the desktop app's video files and `edge-vlm camera --realtime`: frames that come
    while the model is busy are missed, as with a live camera, instead of all being read.
    It still ends with the recording (a paced file is not `live`: nothing to reconnect).
    `clock` and `sleep` are injectable so the pacing is testable without waiting.
    """

    def __init__(self, inner: FrameSource, fps: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.inner, self._fps, self.clock, self.sleep = inner, fps, clock, sleep
        self.name = inner.name
        self._due: float | None = None  # when the next frame is to be delivered

    @property
    def fps(self) -> float:
        return float(self._fps or self.inner.fps or 15.0)  # 15 fps when a file does not say

    def open(self) -> None:
        self.inner.open()
        self._due = None

    def read(self, out: np.ndarray | None = None) -> np.ndarray | None:
        now = self.clock()
        if self._due is not None and self._due > now:
            self.sleep(self._due - now)
        # Scheduled, not slept per frame: no drift; after a stall it carries on, it does not catch up.
        self._due = max(self._due if self._due is not None else now, now) + 1.0 / self.fps
        return self.inner.read(out)

    def close(self) -> None:
        self.inner.close()


def open_source(text_or_spec, *, width: int | None = None, height: int | None = None, fps: float | None = None,
                backend: str = "auto", codec: str = "h264", flip: int = 0, realtime: bool = False) -> FrameSource:
    """Build (not yet open) the right source for a --source argument (a camera index may be an int).

    realtime: play a recorded source (file, folder) at its frame rate, like a camera.
    """
    if isinstance(text_or_spec, SourceSpec):
        spec = text_or_spec
    else:
        spec = parse_source(str(text_or_spec))
    if spec.kind == "folder":
        source: FrameSource = ImageFolderSource(spec.location, fps)
    else:
        source = OpenCVSource(spec, width, height, fps, backend, codec, flip)
    return PacedSource(source) if realtime and not spec.live else source
