"""What the pipeline produces besides alerts: JSON lines, and video with the answers drawn on it."""

from __future__ import annotations

import json
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np

from edge_vlm.errors import EdgeVLMError
from edge_vlm.apps.media.frame_sources import is_jetson, opencv_has_gstreamer
from edge_vlm.apps.media.gstreamer import sink_pipeline

FOURCC = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "XVID", ".mov": "mp4v"}


class JsonLines:
    """One JSON object per answer, flushed at once so `| jq` or a log shipper sees it live."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.lines = 0

    def write(self, record: dict) -> None:
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stream.flush()
        self.lines += 1


def is_stream_url(target: str) -> bool:
    return target.startswith(("udp://", "rtsp://", "rtsps://"))


class AnnotatedVideo:
    """Frames with the latest answer overlaid, written to a file or streamed (udp://, rtsp://).

    Opened on the first frame (its size fixes the video's); the overlay is drawn into one
    reused buffer. Frames come in RGB like every source's; this is the one place they turn
    BGR, the order OpenCV's video writer takes. `set_text` may be called from another thread
    than `write`.
    """

    def __init__(self, target: str, fps: float = 15.0):
        self.target, self.fps = target, fps or 15.0
        if is_stream_url(target):
            if not opencv_has_gstreamer():
                raise EdgeVLMError(f"streaming to {target} needs OpenCV built with GStreamer; "
                                   f"write to a file (e.g. --output out.mp4) instead")
            sink_pipeline(target, jetson=is_jetson())  # validate the URL now, not at the first frame
        else:
            suffix = Path(target).suffix.lower()
            if suffix not in FOURCC:
                raise EdgeVLMError(f"--output {target}: use one of {', '.join(FOURCC)} or udp:// / rtsp://")
            if not Path(target).resolve().parent.is_dir():
                raise EdgeVLMError(f"--output {target}: folder {Path(target).parent} does not exist")
        self._writer = None
        self._canvas: np.ndarray | None = None
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self.frames = 0

    def set_text(self, text: str) -> None:
        with self._lock:
            self._lines = textwrap.wrap(" ".join(text.split()), 60)[:4]

    def _open(self, width: int, height: int) -> None:
        import cv2

        if is_stream_url(self.target):
            writer = cv2.VideoWriter(sink_pipeline(self.target, jetson=is_jetson()), cv2.CAP_GSTREAMER, 0,
                                     self.fps, (width, height))
        else:
            fourcc = cv2.VideoWriter_fourcc(*FOURCC[Path(self.target).suffix.lower()])
            writer = cv2.VideoWriter(self.target, fourcc, self.fps, (width, height))
        if not writer.isOpened():
            raise EdgeVLMError(f"cannot write video to {self.target}")
        self._writer = writer

    def write(self, frame: np.ndarray) -> None:
        """Add one HxWx3 uint8 RGB frame, with the latest answer drawn on it."""
        import cv2

        if self._writer is None:
            self._open(frame.shape[1], frame.shape[0])
        if self._canvas is None or self._canvas.shape != frame.shape:
            self._canvas = np.empty_like(frame)
        cv2.cvtColor(frame, cv2.COLOR_RGB2BGR, dst=self._canvas)
        with self._lock:
            lines = list(self._lines)
        scale = max(frame.shape[0] / 720, 0.35)
        step = int(28 * scale) + 4
        if lines:  # darken a band at the bottom so the text reads on any scene
            top = max(frame.shape[0] - step * len(lines) - 6, 0)
            band = self._canvas[top:]
            np.multiply(band, 0.4, out=band, casting="unsafe")
            for i, line in enumerate(lines):
                y = top + step * (i + 1)
                cv2.putText(self._canvas, line, (6, y), cv2.FONT_HERSHEY_SIMPLEX, 0.8 * scale, (255, 255, 255),
                            max(int(2 * scale), 1), cv2.LINE_AA)
        self._writer.write(self._canvas)
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
