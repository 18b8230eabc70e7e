"""Frame sources behind one small interface, and a feed that keeps only the newest frame.

A VLM answer takes longer than a camera frame, so frames must never queue up: the capture
thread overwrites a single slot, and whoever reads takes the newest frame. Frames replaced
before anyone took them are counted as dropped. Qt-free, so the logic is testable as is.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_vlm.errors import EdgeVLMError
from edge_vlm.apps.media.latest_frame import LatestFrameBuffer


class CameraError(EdgeVLMError):
    """The camera could not be opened or stopped delivering frames."""


class Camera(Protocol):
    name: str

    def open(self) -> None:
        """Start the device; raise CameraError (one readable line) when there is none."""

    def read(self) -> np.ndarray | None:
        """Block until the next HxWx3 uint8 RGB frame; None when the source is gone."""

    def close(self) -> None: ...


class OpenCVCamera:
    """A webcam by index, or a video file played at its own frame rate (as if it were live)."""

    def __init__(self, source: int | str):
        self.source = source
        self.is_file = not isinstance(source, int)
        self.name = Path(str(source)).name if self.is_file else f"Camera {source}"
        self._cap = None
        self._period = 0.0
        self._next = 0.0

    def open(self) -> None:
        import cv2

        if self.is_file and not Path(str(self.source)).is_file():
            raise CameraError(f"video file not found: {self.source}")
        cap = cv2.VideoCapture(self.source if self.is_file else int(self.source))
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"cannot open video {self.source}" if self.is_file else
                              f"no camera found at index {self.source} (is one plugged in and not used by "
                              f"another program?)")
        self._cap = cap
        fps = cap.get(cv2.CAP_PROP_FPS) if self.is_file else 0
        self._period = 1.0 / fps if fps and fps > 0 else 0.0
        self._next = time.monotonic()

    def read(self) -> np.ndarray | None:
        import cv2

        if self._cap is None:
            return None
        if self._period:  # a file plays in real time, like a camera would deliver it
            self._next += self._period
            time.sleep(max(0.0, self._next - time.monotonic()))
        ok, frame = self._cap.read()
        if not ok or frame is None:
            return None
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class FakeCamera:
    """Generated frames (a moving colour pattern with the frame number in it), for tests and demos.

    `unplug_after` frames, it behaves like a camera pulled out mid-stream; `missing` fails to open.
    """

    def __init__(self, fps: float = 60.0, size: tuple[int, int] = (96, 128), unplug_after: int | None = None,
                 missing: bool = False):
        self.name = "Fake camera"
        self.fps, self.size, self.unplug_after, self.missing = fps, size, unplug_after, missing
        self.delivered = 0

    def open(self) -> None:
        if self.missing:
            raise CameraError("no camera found at index 0 (is one plugged in and not used by another program?)")

    @staticmethod
    def frame(i: int, size: tuple[int, int] = (96, 128)) -> np.ndarray:
        h, w = size
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([(x * 2 + i * 5) % 256, (y * 2 + i * 3) % 256, np.full_like(x, (i * 7) % 256)], -1)
        img = img.astype(np.uint8)
        img[:4, :4] = np.array([i % 256, (i // 256) % 256, 0], np.uint8)  # the frame number, readable back
        return img

    @staticmethod
    def frame_number(img: np.ndarray) -> int:
        return int(img[0, 0, 0]) + 256 * int(img[0, 0, 1])

    def read(self) -> np.ndarray | None:
        if self.unplug_after is not None and self.delivered >= self.unplug_after:
            return None
        time.sleep(1.0 / self.fps)
        img = self.frame(self.delivered, self.size)
        self.delivered += 1
        return img

    def close(self) -> None:
        pass


class CameraFeed:
    """Reads a camera in a background thread into a one-frame slot (newest wins, nothing queues)."""

    def __init__(self, camera: Camera):
        self.camera = camera
        self._buffer = LatestFrameBuffer(capacity=1)  # frames overwritten before anyone took them: dropped
        self._taken_index = -1  # the last frame handed out by take()
        self.taken = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Open the camera (raises CameraError at once if there is none) and start capturing."""
        self.camera.open()
        self._thread = threading.Thread(target=self._run, name=f"camera:{self.camera.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                img = self.camera.read()
                if img is None:
                    if not self._stop.is_set():
                        self.error = (f"{self.camera.name} stopped delivering frames (unplugged, or the video "
                                      f"ended); pick a camera and press Start again")
                    return
                self._buffer.put(img)
        except Exception as e:  # a driver error must reach the window as a message, not kill the app
            self.error = f"{self.camera.name} failed: {e}"
        finally:
            self.camera.close()

    @property
    def captured(self) -> int:
        return self._buffer.frames_put

    @property
    def dropped(self) -> int:
        return self._buffer.dropped

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def latest(self) -> tuple[int, np.ndarray | None]:
        """Peek at the newest frame (for the preview); does not count as taking it."""
        frame = self._buffer.peek()
        return (0, None) if frame is None else (frame.index + 1, frame.image)

    def take(self) -> tuple[int, np.ndarray | None]:
        """The newest frame for a question; (seq, None) if no new frame arrived since the last take."""
        frame = self._buffer.latest(after=self._taken_index, timeout=0)
        if frame is None:
            return self.captured, None
        self._taken_index = frame.index
        self.taken += 1
        return frame.index + 1, frame.image

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
