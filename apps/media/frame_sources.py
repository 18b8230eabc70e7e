"""Where frames come from: CSI camera, USB/V4L2 camera, RTSP stream, video file, image folder.

All sources share one small interface (`FrameSource`: open, read, close) so the capture
loop does not care what is on the other end. A *live* source (camera, stream) is read as
fast as it delivers and may drop and reconnect; a *recorded* source (file, folder) is read
frame by frame, in order, and simply ends, with timestamps taken from its own frame rate.

OpenCV's GStreamer backend is used where OpenCV was built with it (JetPack's OpenCV is),
so a Jetson decodes in hardware; otherwise OpenCV's plain backends (V4L2, FFmpeg) read
the same inputs, except CSI cameras, which only exist through GStreamer.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_vlm.errors import MediaError
from .gstreamer import source_pipeline

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class SourceSpec:
    """A parsed --source argument."""

    kind: str  # csi | v4l2 | rtsp | file | folder
    location: str  # sensor id, device path, URL or filesystem path

    @property
    def live(self) -> bool:
        return self.kind in ("csi", "v4l2", "rtsp")

    def __str__(self) -> str:
        return f"csi://{self.location}" if self.kind == "csi" else self.location


def parse_source(text: str) -> SourceSpec:
    """'csi://0', '/dev/video0' or '0', 'rtsp://...', a video file or a folder of images."""
    text = text.strip()
    if not text:
        raise MediaError("empty --source: give a camera (csi://0, /dev/video0), an rtsp:// URL, a video or a folder")
    m = re.fullmatch(r"csi(?::(?://)?(\d+))?", text)
    if m:
        return SourceSpec("csi", m.group(1) or "0")
    if text.isdigit():
        return SourceSpec("v4l2", f"/dev/video{text}")
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


@functools.cache
def opencv_has_gstreamer() -> bool:
    import cv2

    return bool(re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()))


class FrameSource:
    """The interface every source implements."""

    live: bool = False  # True: camera/stream (drop frames, reconnect); False: file/folder (in order, ends)
    fps: float = 0.0  # the source's frame rate when it says (recorded sources use it for timestamps)

    def open(self) -> None:
        """Connect; raise MediaError with one readable line if the source cannot be opened."""

    def read(self, out: np.ndarray | None = None) -> np.ndarray | None:
        """The next BGR uint8 frame (into `out` when its size matches), or None at the end or on a drop."""
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
        self.live = spec.live
        self.backend = ("gstreamer" if opencv_has_gstreamer() else "opencv") if backend == "auto" else backend
        no_gst = self.backend != "gstreamer" or not opencv_has_gstreamer()
        if no_gst and (spec.kind == "csi" or backend == "gstreamer"):
            need = "CSI cameras need" if spec.kind == "csi" else "--backend gstreamer needs"
            raise MediaError(f"{spec}: {need} OpenCV's GStreamer backend (Ubuntu/JetPack python3-opencv has it, "
                             f"pip's opencv-python-headless does not)")
        self._cap = None

    def describe(self) -> str:
        """The pipeline string or device handed to OpenCV (for logs and --help debugging)."""
        if self.backend == "gstreamer":
            return source_pipeline(self.spec.kind, self.spec.location, jetson=is_jetson(), width=self.width,
                                   height=self.height, fps=self.requested_fps, flip=self.flip, codec=self.codec)
        return self.spec.location

    def open(self) -> None:
        import cv2

        self.close()
        where = str(self.spec)
        if self.spec.kind == "file" and not Path(self.spec.location).is_file():
            raise MediaError(f"video not found: {where}")
        if self.spec.kind == "v4l2" and self.backend == "opencv" and not Path(self.spec.location).exists():
            raise MediaError(f"camera not found: {where} does not exist "
                             f"(is it plugged in? see `v4l2-ctl --list-devices`)")
        if self.backend == "gstreamer":
            cap = cv2.VideoCapture(self.describe(), cv2.CAP_GSTREAMER)
        elif self.spec.kind == "v4l2":
            cap = cv2.VideoCapture(int(re.sub(r"\D", "", self.spec.location) or 0), cv2.CAP_V4L2)
        else:
            cap = cv2.VideoCapture(self.spec.location)
        if not cap.isOpened():
            cap.release()
            what = {"file": "not a video or an unsupported codec", "rtsp": "stream unreachable or refused",
                    "v4l2": "device busy or not a camera", "csi": "camera not detected by nvargus-daemon"}
            how = f" (GStreamer pipeline: {self.describe()})" if self.backend == "gstreamer" else ""
            raise MediaError(f"cannot open {where}: {what[self.spec.kind]}{how}")
        if self.backend == "opencv" and self.live:
            for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, self.width), (cv2.CAP_PROP_FRAME_HEIGHT, self.height),
                                (cv2.CAP_PROP_FPS, self.requested_fps)):
                if value:
                    cap.set(prop, value)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # V4L2: keep the driver queue short, we want the newest frame
        self.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) or float(self.requested_fps or 0.0)
        self._cap = cap

    def read(self, out: np.ndarray | None = None) -> np.ndarray | None:
        if self._cap is None:
            return None
        ok, frame = self._cap.read(out) if out is not None else self._cap.read()
        return frame if ok and frame is not None and frame.size else None

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class ImageFolderSource(FrameSource):
    """The images of a folder, in name order, as a recorded stream at `fps` frames a second."""

    def __init__(self, folder: str | Path, fps: float | None = None):
        self.folder = Path(folder)
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
        import cv2

        while self._next < len(self._files):
            path = self._files[self._next]
            self._next += 1
            frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if frame is not None:  # an unreadable file in the folder is skipped, not fatal
                if out is not None and out.shape == frame.shape:
                    np.copyto(out, frame)
                    return out
                return frame
        return None


def open_source(text_or_spec, *, width: int | None = None, height: int | None = None, fps: float | None = None,
                backend: str = "auto", codec: str = "h264", flip: int = 0) -> FrameSource:
    """Build (not yet open) the right source for a --source argument."""
    spec = text_or_spec if isinstance(text_or_spec, SourceSpec) else parse_source(str(text_or_spec))
    if spec.kind == "folder":
        return ImageFolderSource(spec.location, fps)
    return OpenCVSource(spec, width, height, fps, backend, codec, flip)
