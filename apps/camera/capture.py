"""The capture thread: read a live source as fast as it delivers, keep only the newest frame.

A recorded source read like a camera (--realtime) comes wrapped in
edge_vlm.apps.media.frame_sources.PacedSource, which does the pacing: this loop never sleeps.

A camera that is unplugged or a stream that drops is reopened with exponential back-off
(0.5 s, 1 s, 2 s ... up to a ceiling), forever: the pipeline is meant to run unattended.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from edge_vlm.errors import MediaError
from edge_vlm.apps.media.frame_sources import FrameSource
from edge_vlm.apps.media.latest_frame import LatestFrameBuffer


class CaptureThread(threading.Thread):
    def __init__(self, source: FrameSource, buffer: LatestFrameBuffer, stop: threading.Event,
                 clock: Callable[[], float] = time.monotonic, backoff: tuple[float, float] = (0.5, 30.0),
                 on_frame: Callable[[np.ndarray], None] | None = None, log: Callable[[str], None] = print):
        super().__init__(name="edge-vlm-capture", daemon=True)
        self.source, self.buffer, self.stop, self.clock = source, buffer, stop, clock
        self.backoff, self.on_frame, self.log = backoff, on_frame, log
        self.reconnects = 0
        self.delays: list[float] = []  # every back-off waited, for logs and tests
        self._delay = backoff[0]  # grows while reconnects fail or deliver nothing; reset by a good frame
        self.error: BaseException | None = None

    def run(self) -> None:
        scratch: np.ndarray | None = None  # cv2 decodes into this array again and again
        try:
            while not self.stop.is_set():
                frame = self.source.read(scratch)
                if frame is None:
                    if not self.source.live or not self._reconnect():
                        return  # a file ended, or we were asked to stop while reconnecting
                    continue
                scratch, self._delay = frame, self.backoff[0]
                self.buffer.put(frame, self.clock())
                if self.on_frame:
                    self.on_frame(frame)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which re-raises it
            self.error = e
        finally:
            self.source.close()
            self.buffer.close()

    def _reconnect(self) -> bool:
        """Reopen the source until it works (True) or stop is set (False)."""
        self.source.close()
        ceiling = self.backoff[1]
        self.log(f"source stopped delivering frames; reconnecting in {self._delay:g} s")
        while True:
            self.delays.append(self._delay)
            if self.stop.wait(self._delay):
                return False
            try:
                self.source.open()
            except MediaError as e:
                self._delay = min(self._delay * 2, ceiling)
                self.log(f"reconnect failed ({e}); next try in {self._delay:g} s")
                continue
            self._delay = min(self._delay * 2, ceiling)  # if it drops again before a frame, wait longer
            self.reconnects += 1
            self.log("source reconnected")
            return True
