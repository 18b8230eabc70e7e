"""A cheap "did the scene change?" score, so the VLM only runs when there is something new.

Both frames are shrunk to a small grayscale thumbnail (area averaging removes sensor noise
and JPEG/H.264 block artefacts) and compared by mean absolute difference, scaled to 0..1:
0 = identical, 1 = black turned white. It costs well under a millisecond per 1080p frame,
against a second or more for a VLM answer.
"""

from __future__ import annotations

import numpy as np

THUMB = (32, 24)  # width, height of the thumbnail: coarse enough to ignore noise, fine enough to see a person


def thumbnail(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """HxWx3 RGB (or HxW) uint8 -> THUMB-sized float32 grayscale in 0..1."""
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    small = cv2.resize(gray, THUMB, interpolation=cv2.INTER_AREA)
    if out is None:
        out = np.empty(small.shape, np.float32)
    np.multiply(small, 1 / 255, out=out, casting="unsafe")
    return out


def change_score(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two frames' thumbnails, in 0..1."""
    return float(np.abs(thumbnail(a) - thumbnail(b)).mean())


class SceneChangeDetector:
    """Scores each frame against a reference: the frame the VLM last looked at.

    Comparing with the last *answered* frame (not the previous frame) catches slow changes
    too: a person walking in over ten frames adds up to one big difference.
    """

    def __init__(self, threshold: float = 0.1):
        self.threshold = threshold
        self._ref: np.ndarray | None = None
        self._cur = np.empty(THUMB[::-1], np.float32)  # reused: no allocation per frame

    def score(self, image: np.ndarray) -> float:
        """Difference from the reference (1.0 when there is none yet)."""
        thumbnail(image, self._cur)
        if self._ref is None:
            return 1.0
        return float(np.abs(self._cur - self._ref).mean())

    def changed(self, image: np.ndarray) -> tuple[bool, float]:
        s = self.score(image)
        return s >= self.threshold, s

    def set_reference(self, image: np.ndarray) -> None:
        """Make `image` the frame later frames are compared with."""
        self._ref = thumbnail(image, self._ref)
