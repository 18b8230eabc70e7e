"""When to ask the model about a frame: every --interval seconds, and/or when the scene changes."""

from __future__ import annotations

import numpy as np

from edge_vlm.apps.media.scene_change import SceneChangeDetector


class Trigger:
    """Decides, frame by frame, whether this one goes to the VLM.

    interval: seconds between answers on the stream clock (0 = every frame the model can
    take, None = never by time). change_threshold: also fire as soon as the frame differs
    from the last answered one by this score (see edge_vlm.apps.media.scene_change), None = off.
    The first frame always fires, so there is an answer (and a reference) right away.
    """

    def __init__(self, interval: float | None = 5.0, change_threshold: float | None = None):
        if interval is None and change_threshold is None:
            raise ValueError("a trigger needs an interval or a change threshold")
        self.interval = interval
        self.detector = SceneChangeDetector(change_threshold) if change_threshold is not None else None
        self.last_fired: float | None = None

    def check(self, image: np.ndarray, now: float) -> tuple[str | None, float | None]:
        """(reason or None, change score or None) for a frame seen at time `now`."""
        changed, score = self.detector.changed(image) if self.detector else (False, None)
        if self.last_fired is None:
            return "first", score
        if self.interval is not None and now - self.last_fired >= self.interval:
            return "interval", score
        if changed:
            return "change", score
        return None, score

    def fired(self, image: np.ndarray, now: float) -> None:
        """Record that the model looked at `image` at `now` (resets the clock and the reference)."""
        self.last_fired = now
        if self.detector:
            self.detector.set_reference(image)
