"""Frame sources for tests: they implement edge_vlm.apps.media.frame_sources.FrameSource and
break on purpose, so the apps' camera handling is tested without a camera (the product keeps
no fakes)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edge_vlm.apps.media.frame_sources import FrameSource, open_source
from edge_vlm.errors import MediaError


class FakeCamera(FrameSource):
    """Generated RGB frames (a moving colour pattern with the frame number in it) at `fps`.

    `unplug_after` frames, it behaves like a camera pulled out mid-stream; `missing` fails to open.
    """

    live = True

    def __init__(self, fps: float = 60.0, size: tuple[int, int] = (96, 128), unplug_after: int | None = None,
                 missing: bool = False):
        self.name = "Fake camera"
        self.fps, self.size, self.unplug_after, self.missing = float(fps), size, unplug_after, missing
        self.delivered = 0

    def open(self) -> None:
        if self.missing:
            raise MediaError("no camera found at index 0 (is one plugged in and not used by another program?)")

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

    def read(self, out: np.ndarray | None = None) -> np.ndarray | None:
        if self.unplug_after is not None and self.delivered >= self.unplug_after:
            return None
        time.sleep(1.0 / self.fps)  # blocks like a camera waiting for its next frame
        img = self.frame(self.delivered, self.size)
        self.delivered += 1
        if out is not None and out.shape == img.shape:
            np.copyto(out, img)
            return out
        return img

    def close(self) -> None:
        pass


class FlakyCamera(FrameSource):
    """A live source playing a clip over and over, like an endless camera, that breaks on purpose:
    it drops once after `drop_after` frames and refuses the next `refusals` reopens.

    `rate` frames a second (None: as fast as the clip decodes)."""

    live = True

    def __init__(self, clip: Path, drop_after: int | None = None, refusals: int = 0, rate: float | None = 200.0):
        self.inner = open_source(clip)
        self.name = f"flaky {Path(clip).name}"
        self.period = 1 / rate if rate else 0.0
        self.drop_after, self.refusals = drop_after, refusals
        self.opens = self.delivered = 0

    @property
    def fps(self) -> float:
        return self.inner.fps

    def open(self) -> None:
        self.opens += 1
        if self.opens > 1 and self.refusals:
            self.refusals -= 1
            raise MediaError("camera busy")
        self.inner.open()

    def read(self, out=None):
        if self.period:
            time.sleep(self.period)  # read() blocks like a real camera's instead of spinning
        if self.drop_after is not None and self.delivered == self.drop_after:
            self.drop_after = None  # fails once, mid-stream
            return None
        frame = self.inner.read(out)
        if frame is None:  # loop the clip like an endless camera
            self.inner.open()
            frame = self.inner.read(out)
        self.delivered += 1
        return frame

    def close(self) -> None:
        self.inner.close()
