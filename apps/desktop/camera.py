"""The window's camera: any media FrameSource, read in the background into a newest-frame buffer.

A VLM answer takes longer than a camera frame, so frames must never queue up: the capture
thread overwrites a single slot (edge_vlm.apps.media.latest_frame.LatestFrameBuffer), and
whoever reads takes the newest frame. Frames replaced before anyone took them are counted as
dropped. Unlike the unattended camera pipeline, the window does not reconnect: a camera that
goes away (or a video that ends) becomes a message, and the user presses Start again.
Qt-free, so the logic is testable as is.
"""

from __future__ import annotations

import threading

import numpy as np

from edge_vlm.apps.media.frame_sources import FrameSource, open_source
from edge_vlm.apps.media.latest_frame import LatestFrameBuffer


def open_camera(source: int | str) -> FrameSource:
    """What the window's Start button opens: a webcam by index, or a video file played in real time.

    A file is paced at its own frame rate, so it behaves like a camera (Live mode sees the
    newest frame, not the next one on disk). OpenCV's plain backends, as on any desktop.
    """
    return open_source(str(source), backend="opencv", realtime=True)


class CameraFeed:
    """Reads a frame source in a background thread into a one-frame slot (newest wins, nothing queues)."""

    def __init__(self, source: FrameSource):
        self.source = source
        self._buffer = LatestFrameBuffer(capacity=1)  # frames overwritten before anyone took them: dropped
        self._taken_index = -1  # the last frame handed out by take()
        self.taken = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Open the source (raises MediaError at once if there is none) and start capturing."""
        self.source.open()
        self._thread = threading.Thread(target=self._run, name=f"camera:{self.source.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        scratch: np.ndarray | None = None  # the source decodes into this array again and again
        try:
            while not self._stop.is_set():
                frame = self.source.read(scratch)
                if frame is None:
                    if not self._stop.is_set():
                        self.error = (f"{self.source.name} stopped delivering frames (unplugged, or the video "
                                      f"ended); pick a camera and press Start again")
                    return
                scratch = frame
                self._buffer.put(frame)  # a copy: the scratch array is read into again
        except Exception as e:  # a driver error must reach the window as a message, not kill the app
            self.error = f"{self.source.name} failed: {e}"
        finally:
            self.source.close()

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
        """Peek at the newest RGB frame (for the preview); does not count as taking it."""
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
