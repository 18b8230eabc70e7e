r"""The camera loop: frames in, answers out.

    source --(capture thread, live only)--> LatestFrameBuffer --> trigger --> ChatSession --> JSON line
                                                                                         \-> overlay, alerts

Live sources (cameras, streams) are read by a capture thread that keeps only the newest
frame, and the stream clock is the wall clock. Recorded sources (files, folders) are read
in order by this loop itself and the stream clock is the video's own time (frame / fps),
so `--interval 2` on a file means every 2 s of video, reproducibly, however fast the
model is. One ChatSession (one static KV cache) serves every question: it is reset, not
recreated, and frame buffers are reused, so memory stays flat for days.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

from edge_vlm.apps.media.frame_sources import FrameSource, PacedSource
from edge_vlm.apps.media.latest_frame import Frame, LatestFrameBuffer
from edge_vlm.contracts import Session
from edge_vlm.generate import GenerationConfig
from edge_vlm.vlm import VisionLanguageModel

from .alerts import Alerter
from .capture import CaptureThread
from .outputs import AnnotatedVideo, JsonLines
from .triggers import Trigger


def structured_value(answer: str, kind: str, stop_reason: str) -> dict:
    """The record's `value` for a constrained answer: the choice, or the parsed JSON; None with a
    `value_error` when the answer was cut short (max_new_tokens, a stop) before the grammar ended."""
    if stop_reason != "eos":
        return {"value": None, "value_error": f"answer cut short ({stop_reason}): raise --max-new-tokens"}
    if kind == "choice":
        return {"value": answer}
    try:
        return {"value": json.loads(answer)}
    except json.JSONDecodeError as e:  # cannot happen for a completed grammar; reported, never raised
        return {"value": None, "value_error": f"not JSON: {e}"}


@dataclass
class PipelineStats:
    frames_seen: int = 0  # frames the trigger looked at
    frames_answered: int = 0
    answers: int = 0
    alerts: int = 0
    dropped: int = 0  # live frames overwritten before the model was free (expected, not an error)
    reconnects: int = 0

    def summary(self) -> str:
        return (f"{self.frames_seen} frames checked, {self.frames_answered} answered ({self.answers} answers), "
                f"{self.alerts} alerts, {self.dropped} frames skipped while busy, {self.reconnects} reconnects")


@dataclass
class CameraPipeline:
    session: Session  # a ChatSession on a model here, or a RemoteSession on a server (--server)
    source: FrameSource  # already open
    prompts: list[str]
    trigger: Trigger
    gen: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=64, temperature=0.0))
    json_out: JsonLines = field(default_factory=JsonLines)
    video_out: AnnotatedVideo | None = None
    alerter: Alerter | None = None
    context_frames: int = 1  # >1: each question sees the last K answered frames (oldest first)
    structured: str | None = None  # "choice" / "json": answers are constrained; records carry the parsed value
    realtime: bool = False  # read a recorded source like a camera (capture thread, wall clock)
    max_frames: int | None = None  # stop after this many frames from the source (trials, tests)
    stop: threading.Event = field(default_factory=threading.Event)
    clock: Callable[[], float] = time.monotonic  # the live stream clock
    backoff: tuple[float, float] = (0.5, 30.0)
    log: Callable[[str], None] = print

    def __post_init__(self):
        self.stats = PipelineStats()
        self._ring: list[np.ndarray] = []  # the last K answered frames, storage reused
        self._ring_next = 0
        self._capture: CaptureThread | None = None

    # ---- frames -------------------------------------------------------------------------

    def _recorded_frames(self) -> Iterator[Frame]:
        fps = self.source.fps or 1.0
        buf: np.ndarray | None = None
        index = 0
        while not self.stop.is_set():
            image = self.source.read(buf)
            if image is None:
                return
            buf = image
            yield Frame(image, index, index / fps)
            index += 1

    def _live_frames(self) -> Iterator[Frame]:
        buffer = LatestFrameBuffer(1)
        t0 = self.clock()
        source = self.source
        if self.realtime and not source.live and not isinstance(source, PacedSource):
            source = PacedSource(source)  # a file read like a camera: at its own frame rate
        self._capture = CaptureThread(source, buffer, self.stop, clock=lambda: self.clock() - t0,
                                      backoff=self.backoff, on_frame=self.video_out.write if self.video_out else None,
                                      log=self.log)
        self._capture.start()
        out: np.ndarray | None = None
        last = -1
        try:
            while not self.stop.is_set():
                frame = buffer.latest(after=last, timeout=0.25, out=out)
                if frame is None:
                    if buffer.closed and buffer.frames_put - 1 <= last:
                        break
                    continue
                out, last = frame.image, frame.index
                yield frame
        finally:
            self.stop.set()
            self._capture.join(timeout=5.0)
            self.stats.dropped = buffer.frames_put - self.stats.frames_seen
            self.stats.reconnects = self._capture.reconnects
            if self._capture.error is not None:
                raise self._capture.error

    def frames(self) -> Iterator[Frame]:
        live = self.source.live or self.realtime
        it = self._live_frames() if live else self._recorded_frames()
        for n, frame in enumerate(it):
            if self.max_frames is not None and n >= self.max_frames:
                self.stop.set()
                break
            yield frame

    # ---- answering -----------------------------------------------------------------------

    def _context_images(self, rgb: np.ndarray) -> list[np.ndarray]:
        """The last K answered frames, oldest first, copied: the source reuses its frame buffer."""
        k = self.context_frames
        if len(self._ring) < k:
            self._ring.append(np.empty_like(rgb))
        slot = self._ring_next % len(self._ring)
        if self._ring[slot].shape != rgb.shape:
            self._ring[slot] = np.empty_like(rgb)
        np.copyto(self._ring[slot], rgb)
        self._ring_next += 1
        n = len(self._ring)
        return [self._ring[(self._ring_next + i) % n] for i in range(n)]  # oldest first

    def answer(self, frame: Frame, reason: str, score: float | None) -> None:
        images = self._context_images(frame.image)
        if len(images) > 1:  # a clip: tiled models give each frame one tile (InternVL); others ignore the mark
            images = [VisionLanguageModel.mark_video_frame(Image.fromarray(im)) for im in images]
        self.stats.frames_answered += 1
        for prompt in self.prompts:
            if self.stop.is_set():
                return
            self.session.reset()  # independent question: same cache buffers, empty conversation
            t0 = time.perf_counter()
            answer = "".join(self.session.ask(prompt, images=images, gen=self.gen, stop_event=self.stop)).strip()
            record = {
                "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
                "stream_time_s": round(frame.timestamp, 3),
                "frame": frame.index,
                "prompt": prompt,
                "answer": answer,
                "latency_s": round(time.perf_counter() - t0, 4),
                "trigger": reason,
                "images": len(images),
            }
            stats = self.session.stats
            record["prompt_tokens"] = stats.prompt_tokens + stats.cached_prompt_tokens
            if score is not None:
                record["change_score"] = round(score, 4)
            if self.structured:
                record.update(structured_value(answer, self.structured, stats.stop_reason))
            record["alert"] = bool(self.alerter and self.alerter.maybe_fire(record, frame.timestamp))
            self.stats.alerts += record["alert"]
            self.stats.answers += 1
            self.json_out.write(record)
            if self.video_out:
                self.video_out.set_text(answer if len(self.prompts) == 1 else f"{prompt} {answer}")

    def run(self) -> PipelineStats:
        """Process frames until the source ends, max_frames, or `stop` is set; always flushes outputs."""
        live = self.source.live or self.realtime
        try:
            for frame in self.frames():
                self.stats.frames_seen += 1
                reason, score = self.trigger.check(frame.image, frame.timestamp)
                if reason is not None:
                    self.trigger.fired(frame.image, frame.timestamp)
                    self.answer(frame, reason, score)
                if self.video_out and not live:  # live: the capture thread writes every frame
                    self.video_out.write(frame.image)
        finally:
            self.stop.set()
            if self._capture is not None and self._capture.is_alive():
                self._capture.join(timeout=5.0)
            self.source.close()
            if self.video_out:
                self.video_out.close()
            if self.alerter:
                self.alerter.close()
            self.json_out.stream.flush()
        return self.stats
