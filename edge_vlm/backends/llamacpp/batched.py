"""Several conversations on one llama.cpp model, decoded together (the server's `--parallel N`).

Decoding one token reads every weight once; on a CPU that read, not the arithmetic, is most of
a step's time. So N conversations that each need one token are cheaper as one `llama_decode`
of N tokens (one per sequence) than as N decodes.

`BatchedContext` owns one llama.cpp context with N sequences (each with `max_context` KV
cells). Its `engines[i]` is an ordinary prefill/step/rewind engine for sequence i, used from
that conversation's own thread exactly like `LlamaCppEngine`: nothing above it (session,
sampler, stop strings, streaming) knows it is batched. A call blocks until the context's own
decode thread runs a decode that includes it: that thread waits (at most `gather_s` after the
first request) for the other slots that took part in the previous decode, then decodes
everything asked so far. A slot that finished its answer says so with `idle()`, so nobody waits
for it. `close()` ends the thread and frees llama.cpp's memory.

Batching changes which rows share a `llama_decode`, not what a row computes: each sequence
attends only to its own cells, so a slot's logits match a lone engine's to llama.cpp's
rounding (tests/backends/test_llamacpp_batched.py).

Drawing in the decode thread: a slot given a `plan` (the answer's sampling settings and seed,
`SlotEngine.plan`) has its tokens drawn by the decode thread itself, right after each decode,
with that answer's own `Sampler`; a step then returns `Drawn` logits (sampling.py) whose token
the caller's sampler hands on. The decode thread also feeds the drawn token into the next decode
at once, before the slot's thread has looked at it (unless it is EOS, the answer's last, or the
context is full), so the decodes go on back to back while each slot's thread turns its last
token into text. At most one such token is ahead of what a slot's thread has confirmed (by
stepping it); one it never steps (a stop string, a stop request) is taken out of the cache
before the slot does anything else. The first token after a prefill is drawn in the slot's
thread, when it is first looked at: a prefill nobody samples after (a restored exchange) draws
nothing, so the seeded stream is the same as a lone session's. Constrained answers (a grammar
mask) have no plan: their slot's thread samples as before.
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...errors import EdgeVLMError
from ...contracts import Prompt
from ...text.sampling import Drawn, GenerationConfig, Sampler
from .engine import Cells, LlamaContext


@dataclass
class Plan:
    """One answer's sampling, for the decode thread: its Sampler (settings and seed), the tokens
    drawn so far (the repetition penalty's history), where the answer must end."""

    sampler: Sampler
    eos: frozenset[int]
    max_new_tokens: int
    repetition: bool
    drawn: list[int] = field(default_factory=list)

    def draw(self, logits: torch.Tensor) -> int:
        history = torch.tensor(self.drawn, dtype=torch.long) if self.repetition else None
        token = self.sampler(logits, history)
        self.drawn.append(token)
        return token

    def goes_on(self, token: int) -> bool:
        """Whether the answer will step `token` (it is not EOS, nor the last the answer may have)."""
        return token not in self.eos and len(self.drawn) < self.max_new_tokens


@dataclass
class _Request:
    slot: int
    rows: list[int] | np.ndarray  # token ids, or [n, n_embd] float32 embeddings
    start: int  # position of the first row
    logits: torch.Tensor | None = None
    error: Exception | None = None
    done: bool = False
    plan: Plan | None = None  # a step whose next token the decode thread draws
    confirmed: bool = True  # the slot's thread stepped this token (False: fed ahead of it)
    token: int | None = None  # the token drawn after it

    @property
    def is_embd(self) -> bool:
        return isinstance(self.rows, np.ndarray)


@dataclass
class _Gather:
    """What the context is waiting to decode, and who it is waiting for."""

    pending: list[_Request] = field(default_factory=list)
    expected: set[int] = field(default_factory=set)  # slots in the last decode that are not idle
    idle: set[int] = field(default_factory=set)  # slots that said they ask nothing more for now
    busy: bool = False  # a thread is inside llama.cpp


class BatchedContext:
    """One GGUF model, `slots` sequences, decoded together; `engines[i]` drives sequence i."""

    name = "llama.cpp"

    def __init__(self, gguf_path: str | Path, slots: int, max_context: int, n_gpu_layers: int = 0,
                 n_threads: int | None = None, batch_size: int = 512, kv_cache_int8: bool = False,
                 gather_s: float = 0.02):
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self._llama = LlamaContext(gguf_path, max_context, slots, n_gpu_layers, n_threads, batch_size, kv_cache_int8)
        self.n_vocab, self.n_embd = self._llama.n_vocab, self._llama.n_embd
        self.max_context = max_context
        self.gather_s = gather_s
        self.gguf_path = self._llama.path
        self._cond = threading.Condition()
        self._gather = _Gather()
        self.decodes = 0  # llama_decode calls so far
        self.decoded_rows = 0  # rows (tokens or embeddings) they carried
        self.shared_decodes = 0  # decodes that carried rows of more than one slot
        self.engines = [SlotEngine(self, i) for i in range(slots)]
        self._ahead: dict[int, _Request] = {}  # per slot: the step fed ahead of its thread (at most one)
        self._closed = False
        self._thread = threading.Thread(target=self._decoder, name="edge-vlm-llama-decode", daemon=True)
        self._thread.start()

    # ---- what the slot engines call ---------------------------------------------------

    def run(self, slot: int, rows, start: int, plan: Plan | None = None) -> _Request:
        """Decode `rows` for `slot` at positions start.. (together with whatever the other slots
        ask); the done request: its logits [vocab] after the last row and, for a step with a
        `plan`, the token drawn from them."""
        req = _Request(slot, rows, start, plan=plan)
        with self._cond:
            if self._closed:
                raise EdgeVLMError("the batched llama.cpp context is closed")
            self._gather.idle.discard(slot)
            self._gather.pending.append(req)
            self._cond.notify_all()
            while not req.done:
                self._cond.wait()
        if req.error is not None:
            raise req.error
        return req

    def step_ahead(self, slot: int, token: int, start: int) -> _Request | None:
        """The step of `token` at `start` that was fed ahead of `slot`'s thread, now confirmed and
        done (waited for); None when there is none (or it was another token: then it is taken out)."""
        with self._cond:
            req = self._ahead.get(slot)
            if req is None:
                return None
            if list(req.rows) != [token] or req.start != start:  # not what the slot steps: undo it
                self._drop_ahead(slot)
                return None
            req.confirmed = True
            while not req.done:
                self._cond.wait()
            del self._ahead[slot]
            if req.error is None:
                self._feed_ahead(req)  # (when it finished before it was confirmed)
        if req.error is not None:
            raise req.error
        return req

    def drop_ahead(self, slot: int) -> None:
        """Take out of the cache whatever was fed ahead of `slot`'s thread (it will not step it)."""
        with self._cond:
            self._drop_ahead(slot)

    def _drop_ahead(self, slot: int) -> None:
        req = self._ahead.pop(slot, None)
        if req is None:
            return
        if req in self._gather.pending:  # not decoded yet: nothing in the cache
            self._gather.pending.remove(req)
            return
        while not req.done or self._gather.busy:
            self._cond.wait()
        self._llama.remove(slot, req.start)

    def _feed_ahead(self, req: _Request) -> None:
        """(under the lock) After a confirmed step whose next token was drawn: feed that token into
        the next decode, unless the answer ends there or the context is full."""
        plan, token = req.plan, req.token
        if plan is None or token is None or not req.confirmed or req.slot in self._ahead or self._closed:
            return
        if not plan.goes_on(token) or req.start + 2 > self.max_context:
            return
        nxt = _Request(req.slot, [token], req.start + 1, plan=plan, confirmed=False)
        self._ahead[req.slot] = nxt
        self._gather.pending.append(nxt)
        self._gather.idle.discard(req.slot)
        self._cond.notify_all()

    def _decoder(self) -> None:
        """The one thread that calls llama_decode (a different caller each step costs llama.cpp's
        CPU threads about a third more time a step): waits for the expected slots, at most
        `gather_s` after the first request, then decodes everything asked."""
        g = self._gather
        with self._cond:
            while True:
                while not g.pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    for r in g.pending:
                        r.error, r.done = EdgeVLMError("the batched llama.cpp context is closed"), True
                    self._cond.notify_all()
                    return
                deadline = time.monotonic() + self.gather_s
                while not self._closed:
                    missing = g.expected - {r.slot for r in g.pending}
                    left = deadline - time.monotonic()
                    if not missing or left <= 0:
                        break
                    self._cond.wait(left)
                batch, g.pending, g.busy = g.pending, [], True
                self._cond.release()
                try:
                    self._decode(batch)
                    for r in batch:  # each planned slot's next token, drawn here, not in N slot threads
                        if r.plan is not None and r.error is None:
                            r.token = r.plan.draw(r.logits)
                finally:
                    self._cond.acquire()
                    g.busy = False
                    g.expected = {r.slot for r in batch if r.error is None} - g.idle
                    for r in batch:  # under the lock: a slot that sees its result can't have been re-expected after idling
                        r.done = True
                    for r in batch:
                        if r.error is None:
                            self._feed_ahead(r)
                    self._cond.notify_all()

    def idle(self, slot: int) -> None:
        """`slot` asks nothing more for now (its answer is over): do not wait for it."""
        with self._cond:
            self._drop_ahead(slot)
            self._gather.expected.discard(slot)
            self._gather.idle.add(slot)
            self._cond.notify_all()

    def remove(self, slot: int, position: int) -> None:
        """Drop sequence `slot`'s cells from `position` on."""
        with self._cond:
            while self._gather.busy:
                self._cond.wait()
            self._llama.remove(slot, position)

    # ---- llama.cpp ---------------------------------------------------------------------

    def _decode(self, batch: list[_Request]) -> None:
        """Every request's rows, token requests packed together, each embedding request alone
        (a llama_batch holds either token ids or embeddings)."""
        tokens = [r for r in batch if not r.is_embd]
        try:
            if tokens:
                self._decode_rows(tokens, self._llama.tokens)
            for r in batch:
                if r.is_embd:
                    self._decode_rows([r], self._llama.embeds)
        except Exception as e:  # noqa: BLE001 - each waiting slot gets the failure as its own
            for r in batch:
                if r.logits is None:
                    r.error = e

    def _decode_rows(self, reqs: list[_Request], batch) -> None:
        rows = [(r, j) for r in reqs for j in range(len(r.rows))]
        size = self._llama.batch_size
        for lo in range(0, len(rows), size):
            chunk = rows[lo:lo + size]
            last = []
            for k, (r, j) in enumerate(chunk):
                if r.is_embd:
                    ctypes.memmove(ctypes.addressof(batch.embd.contents) + k * self.n_embd * 4,
                                   r.rows[j].ctypes.data, self.n_embd * 4)
                else:
                    batch.token[k] = int(r.rows[j])
                batch.pos[k] = r.start + j
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = r.slot
                is_last = j == len(r.rows) - 1
                batch.logits[k] = 1 if is_last else 0
                if is_last:
                    last.append((k, r))
            batch.n_tokens = len(chunk)
            self._llama.decode(batch)
            self.decodes += 1
            self.decoded_rows += len(chunk)
            self.shared_decodes += len({r.slot for r, _ in chunk}) > 1
            for k, r in last:
                r.logits = self._llama.logits(k)

    def close(self) -> None:
        """Stop the decode thread, then free llama.cpp's context, model and batches."""
        cond = getattr(self, "_cond", None)
        if cond is not None:
            with cond:
                self._closed = True
                cond.notify_all()
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=30)
        self._llama.close()


def batched_context(model, slots: int, max_context: int) -> BatchedContext:
    """`slots` sequences over `model`'s GGUF (its LLM must run on llama.cpp), set up as the
    model's own engines are (layers on the GPU when it runs there, its KV cache type)."""
    if model.gguf_path is None:
        raise EdgeVLMError("batched decoding (--parallel) needs the LLM on llama.cpp: use --backend llama.cpp, "
                           "or --backend auto on a CPU with llama-cpp-python installed")
    return BatchedContext(model.gguf_path, slots, max_context, n_gpu_layers=-1 if model.device.type == "cuda" else 0,
                          n_threads=model.llm_threads, kv_cache_int8=model.spec.kv_cache_int8)


class SlotEngine:
    """The prefill/step engine of one sequence of a `BatchedContext` (one conversation)."""

    name = "llama.cpp"

    def __init__(self, context: BatchedContext, slot: int):
        self.context = context
        self.slot = slot
        self._position = 0
        self._plan: Plan | None = None
        self._gen: GenerationConfig | None = None
        self._eos: frozenset[int] = frozenset()
        self._cells = Cells()  # what this sequence's cells hold: a prompt that starts the same reuses them
        self.reused_tokens = 0

    def plan(self, gen: GenerationConfig | None, eos_ids=()) -> None:
        """Draw the tokens of the next answer(s) with `gen` in the decode thread (module docstring);
        None, or a `gen` with a constraint: the caller samples. Each prefill starts a new answer."""
        self._gen = None if gen is None or gen.constraint is not None else gen
        self._eos = frozenset(eos_ids)
        self._plan = None

    @property
    def position(self) -> int:
        return self._position

    @property
    def max_context(self) -> int:
        return self.context.max_context

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def prefill(self, prompt: Prompt | torch.Tensor) -> torch.Tensor | Drawn:
        pieces = [prompt[0]] if isinstance(prompt, torch.Tensor) else list(prompt.pieces())
        if not pieces:
            raise ValueError("an empty prompt")
        self.context.drop_ahead(self.slot)
        logits, self.reused_tokens = None, 0
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            kept = self._cells.reusable(self._position, piece, keep_last=last)
            self._position += kept
            self.reused_tokens += kept
            if kept < len(piece):
                logits = self._run(piece[kept:]).logits
        if self._gen is None:
            self._plan = None
            return logits
        g = self._gen  # a new answer: its own sampler, from the seed (the first token drawn when looked at)
        self._plan = Plan(Sampler(g.sampling()), self._eos, g.max_new_tokens, g.repetition_penalty != 1.0)
        return Drawn(logits, draw=self._plan.draw)

    def step(self, token_id: int) -> torch.Tensor | Drawn:
        done = self.context.step_ahead(self.slot, token_id, self._position) if self._plan is not None else None
        if done is not None:
            self._position += 1
            self._cells.add([token_id])
        else:
            done = self._run([token_id], self._plan)
        return done.logits if done.plan is None else Drawn(done.logits, token=done.token)

    def idle(self) -> None:
        self.context.idle(self.slot)

    def rewind(self, position: int) -> None:
        """Go back to `position`; the cells past it stay for a prompt that starts the same (engine.py)."""
        self.context.drop_ahead(self.slot)
        self._position = max(0, min(position, self._position))

    def reset(self) -> None:
        self.rewind(0)

    def _run(self, piece, plan: Plan | None = None) -> _Request:
        if isinstance(piece, torch.Tensor):
            if piece.dim() != 2 or piece.shape[1] != self.context.n_embd:
                raise ValueError(f"embeddings must be [n, {self.context.n_embd}], got {tuple(piece.shape)}")
            rows = np.ascontiguousarray(piece.detach().to(torch.float32).cpu().numpy())
        else:
            rows = list(piece)
        if self._position + len(rows) > self.max_context:
            raise ValueError(f"positions up to {self._position + len(rows)} exceed the context {self.max_context}")
        if self._cells.stale_from(self._position):  # cells a rewind left that this piece does not reuse
            self.context.remove(self.slot, self._position)
        done = self.context.run(self.slot, rows, self._position, plan)
        self._cells.add(rows)
        self._position += len(rows)
        return done
