"""Video input: sample N frames evenly across a clip with OpenCV; and what a picture's PIL info says
about it as a part of a clip (set by the model: `VisionLanguageModel.video_pictures`)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..errors import MediaError

VIDEO_FRAME = "edge_vlm_video_frame"  # a frame of a clip
FRAME_GROUP = "edge_vlm_frame_group"  # a pooled run of frames (NVILA's TSP): the frames it stands for
FRAME_POOL = "edge_vlm_frame_pool"  # and the (rows, columns) its token grid is averaged over


def picture_info(picture) -> dict:
    """A picture's PIL info (arrays and tensors carry none)."""
    return getattr(picture, "info", None) or {}


def is_video_frame(picture) -> bool:
    return bool(picture_info(picture).get(VIDEO_FRAME))


def is_frame_group(picture) -> bool:
    """Whether a picture stands for a pooled run of frames (`frames_of` gives them)."""
    return FRAME_GROUP in picture_info(picture)


def frames_of(picture) -> tuple:
    """The frames a picture stands for: a pooled run's frames, else the picture itself."""
    return picture_info(picture).get(FRAME_GROUP, (picture,))


def sample_frames(path, num_frames: int = 8) -> list[Image.Image]:
    """Return `num_frames` RGB frames spread evenly from first to last (fewer if the clip is shorter)."""

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"video not found: {path}")
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise MediaError(f"cannot read video {path}: not a video or unsupported codec")
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if total <= 0:
            frames = _read_all(cap)  # some containers do not report a frame count
            if not frames:
                raise MediaError(f"cannot read video {path}: it has no readable frames")
            idx = np.linspace(0, len(frames) - 1, min(num_frames, len(frames))).round().astype(int)
            return [frames[i] for i in idx]
        idx = np.linspace(0, total - 1, min(num_frames, total)).round().astype(int)
        frames = []
        for i in idx:
            cap.set(cv2.CAP_PROP_POS_FRAMES, int(i))
            ok, bgr = cap.read()
            if not ok:
                continue
            frames.append(Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
        if not frames:
            raise MediaError(f"cannot read video {path}: no frame could be decoded")
        return frames
    finally:
        cap.release()


def _read_all(cap) -> list[Image.Image]:
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            return frames
        frames.append(Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
