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
rounding (tests/test_llamacpp_batched.py).
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
from .engine import LlamaContext


@dataclass
class _Request:
    slot: int
    rows: list[int] | np.ndarray  # token ids, or [n, n_embd] float32 embeddings
    start: int  # position of the first row
    logits: torch.Tensor | None = None
    error: Exception | None = None
    done: bool = False

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
        self._closed = False
        self._thread = threading.Thread(target=self._decoder, name="edge-vlm-llama-decode", daemon=True)
        self._thread.start()

    # ---- what the slot engines call ---------------------------------------------------

    def run(self, slot: int, rows, start: int) -> torch.Tensor:
        """Decode `rows` for `slot` at positions start.. (together with whatever the other slots
        ask); the logits [vocab] after the last row."""
        req = _Request(slot, rows, start)
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
        return req.logits

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
                finally:
                    self._cond.acquire()
                    g.busy = False
                    g.expected = {r.slot for r in batch if r.error is None} - g.idle
                    for r in batch:  # under the lock: a slot that sees its result can't have been re-expected after idling
                        r.done = True
                    self._cond.notify_all()

    def idle(self, slot: int) -> None:
        """`slot` asks nothing more for now (its answer is over): do not wait for it."""
        with self._cond:
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
                          n_threads=model.llm_threads, kv_cache_int8=getattr(model.llm, "kv_cache_int8", False))


class SlotEngine:
    """The prefill/step engine of one sequence of a `BatchedContext` (one conversation)."""

    name = "llama.cpp"

    def __init__(self, context: BatchedContext, slot: int):
        self.context = context
        self.slot = slot
        self._position = 0

    @property
    def position(self) -> int:
        return self._position

    @property
    def max_context(self) -> int:
        return self.context.max_context

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def prefill(self, prompt: Prompt | torch.Tensor) -> torch.Tensor:
        pieces = [prompt[0]] if isinstance(prompt, torch.Tensor) else list(prompt.pieces())
        if not pieces:
            raise ValueError("an empty prompt")
        logits = None
        for piece in pieces:
            logits = self._run(piece)
        return logits

    def step(self, token_id: int) -> torch.Tensor:
        return self._run([token_id])

    def idle(self) -> None:
        self.context.idle(self.slot)

    def rewind(self, position: int) -> None:
        position = max(0, min(position, self._position))
        if position < self._position:
            self.context.remove(self.slot, position)
        self._position = position

    def reset(self) -> None:
        self.rewind(0)

    def _run(self, piece) -> torch.Tensor:
        if isinstance(piece, torch.Tensor):
            if piece.dim() != 2 or piece.shape[1] != self.context.n_embd:
                raise ValueError(f"embeddings must be [n, {self.context.n_embd}], got {tuple(piece.shape)}")
            rows = np.ascontiguousarray(piece.detach().to(torch.float32).cpu().numpy())
        else:
            rows = list(piece)
        if self._position + len(rows) > self.max_context:
            raise ValueError(f"positions up to {self._position + len(rows)} exceed the context {self.max_context}")
        logits = self.context.run(self.slot, rows, self._position)
        self._position += len(rows)
        return logits
