"""`--parallel N`: up to N requests answered at once, their decode steps batched in llama.cpp.

`ModelWorker` answers one request at a time. `ParallelWorker` keeps N lanes, each a
conversation (`ChatSession`) whose engine is one sequence of a shared `BatchedContext`: every
lane runs the single worker's per-request code in its own thread, and their steps meet in one
`llama_decode` (one read of the weights for N tokens); each lane's tokens are drawn in the
context's decode thread with the request's own sampling settings and seed (`SlotEngine.plan`),
so the lanes only turn tokens into text. Requests still leave the bounded queue in
arrival order; each goes to the idle lane whose conversation it extends, so its KV prefix is
reused there as with one lane, else to the lane idle the longest.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from edge_vlm import ChatSession
from edge_vlm.backends.llamacpp.batched import batched_context

from .worker import Job, ModelWorker


def _key(m) -> tuple:
    return (m.role, m.content, len(m.images), len(m.tool_calls), m.tool_call_id)


@dataclass
class _Lane:
    session: ChatSession
    jobs: queue.Queue = field(default_factory=queue.Queue)
    seen: list = field(default_factory=list)  # message keys of the conversation in its cache
    idle_since: float = field(default_factory=time.monotonic)
    busy: bool = False


def _shared(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ParallelWorker(ModelWorker):
    def __init__(self, parallel: int, **kw):
        super().__init__(**kw)
        self.parallel = parallel
        self.context = None
        self._lanes: list[_Lane] = []
        self._free = threading.Condition()
        self._lane_threads: list[threading.Thread] = []

    def attach(self, model) -> None:
        """Serve `model` on `parallel` lanes (its LLM must run on llama.cpp)."""
        self.model, self.image_cache = model, self._new_image_cache(model)
        ctx = self.max_context or model.max_context
        self.context = batched_context(model, self.parallel, ctx)
        self._lanes = [_Lane(ChatSession(model, engine=e, encoder=self.image_cache)) for e in self.context.engines]
        for i, lane in enumerate(self._lanes):
            t = threading.Thread(target=self._lane_loop, args=(lane,), name=f"edge-vlm-lane-{i}", daemon=True)
            t.start()
            self._lane_threads.append(t)
        self.session = self._lanes[0].session  # what /v1/models reads (max_context)
        self._thread = threading.Thread(target=self._run, name="edge-vlm-dispatch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        super().close()  # the dispatcher ends, and hands each lane its end
        for t in self._lane_threads:
            t.join(timeout=10)

    # ---- dispatch -----------------------------------------------------------------------

    def _run(self) -> None:
        """Hand each job, in arrival order, to an idle lane as soon as there is one."""
        while True:
            job = self._jobs.get()
            self._gauge()
            if job is None:
                for lane in self._lanes:
                    lane.jobs.put(None)
                return
            lane = self._take_lane(job)
            lane.jobs.put(job)

    def _take_lane(self, job: Job) -> _Lane:
        keys = [_key(m) for m in job.messages]
        with self._free:
            while True:
                idle = [lane for lane in self._lanes if not lane.busy]
                if idle:
                    lane = max(idle, key=lambda la: (_shared(la.seen, keys), -la.idle_since))
                    lane.busy = True
                    return lane
                self._free.wait()

    def _lane_loop(self, lane: _Lane) -> None:
        engine = lane.session.engine
        while True:
            job = lane.jobs.get()
            if job is None:
                return
            try:
                engine.plan(job.gen, self.model.eos_token_ids)  # drawn in the decode thread (constrained: here)
                self._serve(job, lane.session, lanes=self.parallel)
            finally:
                engine.idle()
                turns = lane.session.turns
                answer = [("assistant", turns[-1].answer, 0, 0, None)] if turns else []
                lane.seen = [_key(m) for m in job.messages] + answer
                with self._free:
                    lane.busy, lane.idle_since = False, time.monotonic()
                    self._free.notify_all()
