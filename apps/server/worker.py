"""The one thread that runs the model: requests are served in arrival order from a bounded queue.

The HTTP side never touches the model. It first takes a `Place` in the bounded queue (before it
reads or decodes any media, so a full queue costs nothing), then submits a `Job` and reads its
events (`started`, text pieces, then `done` or `error`) from an asyncio queue the worker fills
thread-safely. A job's `stop` event (client gone, timeout) ends its generation at the next token;
a job stopped while still waiting gives its place back at once and is skipped, so the model is
free for the next one. One `ChatSession` serves all requests: a request that extends the
conversation in its KV cache reuses that prefix. Its pictures go through the server's cache of
image embeddings (image_cache.py), the session's encoder.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from edge_vlm import ChatSession, EdgeVLMError, GenerationConfig, GenerationStats

from .errors import APIError
from .image_cache import CachedImages


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after


class Place:
    """One request's place among the worker's `max_queue` (waiting or running); `release` gives
    it back, once, whoever calls it first (the worker when the job ends, the HTTP side when the
    request fails before it is queued or its client leaves while it waits)."""

    def __init__(self, worker: "ModelWorker"):
        self._worker = worker
        self._held = True

    def release(self) -> None:
        with self._worker._lock:
            if self._held:
                self._held = False
                self._worker._admitted -= 1


@dataclass(frozen=True)
class Result:
    """What a finished generation reports: the session's stats of it (usage, timings, why it
    ended), and what the answer holds beside its streamed text."""

    stats: GenerationStats
    tool_calls: list = field(default_factory=list)  # parsed from the answer when tools were offered
    content: str | None = None  # the answer's text beside its calls (the session's reply)


@dataclass
class Job:
    messages: list
    gen: GenerationConfig
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() after which the job is stopped
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    stop: threading.Event = field(default_factory=threading.Event)
    why_stopped: str = ""  # "disconnected" | "timeout"
    queued_at: float = field(default_factory=time.monotonic)
    tools: list = field(default_factory=list)  # OpenAI specs offered in the prompt (the session's tools)
    context: list = field(default_factory=list)  # RAG documents
    place: Place | None = None  # its place in the queue, given back when it ends or leaves waiting
    started: bool = False  # the worker has taken it up (set in the worker thread)

    def cancel(self, why: str) -> None:
        if not self.stop.is_set():
            self.why_stopped = why
            self.stop.set()
        if not self.started and self.place is not None:  # still waiting: its place is free now
            self.place.release()

    def emit(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (shutdown)
            pass


class ModelWorker:
    def __init__(self, max_queue: int = 16, image_cache: int = 64, max_context: int | None = None, metrics=None):
        self.max_queue = max_queue
        self.image_cache_size = image_cache
        self.max_context = max_context
        self.metrics = metrics
        self.model = None  # the loaded model (attach)
        self.image_cache: CachedImages | None = None  # the sessions' image encoder
        self.session: ChatSession | None = None
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._admitted = 0  # waiting + running
        self._avg_s = 1.0  # running mean of a job's time, for Retry-After
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self.session is not None

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    def attach(self, model) -> None:
        """Serve `model` (loaded elsewhere): the worker thread starts here."""
        self.model, self.image_cache = model, self._new_image_cache(model)
        self.session = ChatSession(model, max_context=self.max_context, encoder=self.image_cache)
        self._thread = threading.Thread(target=self._run, name="edge-vlm-model", daemon=True)
        self._thread.start()

    def _new_image_cache(self, model) -> CachedImages:
        return CachedImages(model.encode_images, model.images_vary_in_length, self.image_cache_size)

    def admit(self) -> Place:
        """A place in the queue, or QueueFull (with a Retry-After estimate) when all are taken."""
        with self._lock:
            if self._admitted >= self.max_queue:
                raise QueueFull(max(1, min(60, round(self._avg_s * self._admitted))))
            self._admitted += 1
        return Place(self)

    def submit(self, job: Job) -> None:
        """Queue `job` (its `place` from `admit`; taken here when it has none)."""
        if job.place is None:
            job.place = self.admit()
        self._jobs.put(job)
        self._gauge()

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=10)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.waiting)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            self._gauge()
            if job is None:
                return
            self._serve(job, self.session)

    def _serve(self, job: Job, session: ChatSession, lanes: int = 1) -> None:
        """Answer one job on `session` (unless it was stopped while waiting), then count it out.
        `lanes`: how many jobs run side by side (the --parallel worker), for Retry-After."""
        t0 = time.monotonic()
        job.started = True
        final = ("error", None)  # stopped (the HTTP side says why)
        try:
            if time.monotonic() > job.deadline:
                job.cancel("timeout")
            if not job.stop.is_set():
                final = self._generate(job, session)
        finally:  # the place is free before the client hears the end: its next request finds it free
            job.place.release()
            self._avg_s = 0.8 * self._avg_s + 0.2 * (time.monotonic() - t0) / lanes
            job.emit(*final)

    def _generate(self, job: Job, session: ChatSession) -> tuple[str, object]:
        """Stream the job's pieces; its last event (`done` with the Result, or `error`) is returned."""
        try:
            for piece in session.chat(job.messages, job.gen, job.stop, tools=job.tools, context=job.context):
                job.emit("piece", piece)
                if time.monotonic() > job.deadline:
                    job.cancel("timeout")
        except EdgeVLMError as e:
            return "error", APIError(400, str(e), "messages", "invalid_request")
        except Exception as e:  # noqa: BLE001 - one failed request must not stop the server
            print(f"edge-vlm serve: request failed: {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            out_of_memory = isinstance(e, MemoryError) or "out of memory" in str(e)
            return "error", APIError(503 if out_of_memory else 500,
                                     "out of memory" if out_of_memory else f"internal error ({type(e).__name__})",
                                     None, "out_of_memory" if out_of_memory else "internal_error")
        s = session.stats
        if job.stop.is_set() and s.stop_reason == "stopped":
            if self.metrics is not None:
                self.metrics.generated_tokens.inc(s.new_tokens)
            return "error", None  # the HTTP side says why (timeout, client gone)
        result = Result(s, tool_calls=session.tool_calls, content=session.reply["content"])
        if self.metrics is not None:
            self.metrics.observe(s)
        return "done", result
