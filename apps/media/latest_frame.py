"""A bounded, drop-oldest frame buffer between a capture thread and a slow consumer.

A camera delivers 30 frames a second; a VLM answers one question every second or so. If
frames queued up, answers would describe the past and memory would grow without end.
So the buffer holds at most `capacity` frames (default 1: only the latest), the newest
overwrites the oldest, and the pixel storage is preallocated slots that are copied into,
never reallocated: memory stays flat however long it runs.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class Frame:
    """One captured image with where it sits in the stream."""

    image: np.ndarray  # HxWx3 uint8 RGB, as every FrameSource delivers it
    index: int  # 0-based position in the stream (counts every frame put, dropped or not)
    timestamp: float  # seconds on the producer's clock


class LatestFrameBuffer:
    def __init__(self, capacity: int = 1):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._slots: list[np.ndarray | None] = [None] * capacity
        self._meta: list[tuple[int, float]] = [(-1, 0.0)] * capacity
        self._count = 0  # frames put so far; the next frame's index
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0  # frames overwritten before anyone took them
        self._taken_upto = -1  # index of the newest frame handed out

    def put(self, image: np.ndarray, timestamp: float | None = None) -> int:
        """Store a copy of `image` as the newest frame (overwriting the oldest); return its index."""
        with self._cond:
            i = self._count % self.capacity
            slot = self._slots[i]
            if slot is None or slot.shape != image.shape or slot.dtype != image.dtype:
                slot = self._slots[i] = np.empty_like(image)  # only on the first frame or a size change
            elif self._meta[i][0] > self._taken_upto:
                self.dropped += 1
            np.copyto(slot, image)
            index = self._count
            self._meta[i] = (index, time.monotonic() if timestamp is None else timestamp)
            self._count += 1
            self._cond.notify_all()
            return index

    def close(self) -> None:
        """No more frames will come: wake anyone waiting."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def frames_put(self) -> int:
        return self._count

    def peek(self) -> Frame | None:
        """The newest frame (a copy) without taking it: for previews, it does not stop it counting as dropped."""
        with self._cond:
            if self._count == 0:
                return None
            i = (self._count - 1) % self.capacity
            index, ts = self._meta[i]
            return Frame(self._slots[i].copy(), index, ts)

    def latest(self, after: int = -1, timeout: float | None = None, out: np.ndarray | None = None) -> Frame | None:
        """The newest frame with index > `after`, copied into `out` when it fits (reused storage).

        Waits up to `timeout` seconds (None = forever) for one to arrive; returns None on
        timeout or when the buffer is closed and holds nothing newer.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._count - 1 > after or self._closed, timeout):
                return None
            if self._count - 1 <= after:
                return None
            i = (self._count - 1) % self.capacity
            slot = self._slots[i]
            if out is None or out.shape != slot.shape or out.dtype != slot.dtype:
                out = np.empty_like(slot)
            np.copyto(out, slot)
            index, ts = self._meta[i]
            self._taken_upto = index
            return Frame(out, index, ts)
