"""Generation: prefill the prompt, then decode one token per step.

An `Engine` (contracts.py: our torch decoder, its CUDA-graph replay, llama.cpp) owns the KV cache
and the two model calls (prefill, step); `generate` drives any of them with a sampler and timing,
and `AnswerText` decides where the answer ends (EOS, stop strings) and what text is safe to
stream. A `constraint` (text/constrained.py) masks the logits before sampling, so the answer
matches a JSON schema or a list of choices.
"""

from __future__ import annotations

import resource
import threading
import time
from typing import Iterator

import torch

from .contracts import Engine, GenerationStats, Prompt
from .text.constrained import compile_constraint
from .text.sampling import GenerationConfig, Sampler
from .text.tokenizer import StreamDecoder


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA allocation on GPU; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class AnswerText:
    """Where an answer ends, in one place: EOS tokens, stop strings, and the text streamed so far.

    Sampled tokens go in one by one; complete text comes out. A stop string may arrive split
    over several tokens, so the last `len(longest stop) - 1` characters are held back until it
    is clear they do not start one; a found stop string and everything after it is dropped.
    """

    def __init__(self, tokenizer, eos_ids: set[int], stop_strings: list[str]):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.stops = [s for s in stop_strings if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._decoder = StreamDecoder(tokenizer)
        self.text = ""  # the answer so far (cut at a stop string once one appears)
        self.tokens: list[int] = []  # every sampled token that is part of the answer (not EOS)
        self.stopped = False  # a stop string appeared
        self._sent = 0

    def is_eos(self, token: int) -> bool:
        return token in self.eos_ids

    def push(self, token: int) -> str:
        """Add a sampled token; return the text that is now safe to show ("" if none)."""
        self.tokens.append(token)
        self.text += self._decoder.push(token)
        cut = min((self.text.find(s) for s in self.stops if s in self.text), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self._take(len(self.text))
        return self._take(len(self.text) - self._hold)

    def finish(self) -> str:
        """The held-back rest, once generation is over."""
        if not self.stopped:
            self.text += self._decoder.flush()
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        piece, self._sent = self.text[self._sent:upto], upto
        return piece


def generate(engine: Engine, prompt: Prompt | torch.Tensor, gen: GenerationConfig, answer: AnswerText,
             stop_event: threading.Event | None = None, stats: GenerationStats | None = None,
             t0: float | None = None) -> Iterator[str]:
    """Prefill, then sample and stream the answer's text until EOS, a stop string, the length
    limit, a full context or `stop_event`. Sampled tokens are recorded in `answer.tokens`; the
    last one is NOT yet in the cache (it was never fed), nor are any after a stop string.

    Fills `stats` as it goes: TTFT from `t0` (default: now) to the first sampled token.
    With `gen.constraint`, only tokens the grammar allows are sampled (EOS only where it may end), and
    the answer ends as soon as the grammar is complete and takes nothing more (no further model step).
    """
    stats = stats if stats is not None else GenerationStats()
    device = engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter() if t0 is None else t0
    sampler = Sampler(gen.sampling())
    mask = None if gen.constraint is None else compile_constraint(gen.constraint, answer.tokenizer, answer.eos_ids)
    stats.prompt_tokens = prompt.shape[1] if isinstance(prompt, torch.Tensor) else len(prompt)
    logits = engine.prefill(prompt)
    history = answer.tokens
    t_first = None
    stats.stop_reason = "max_new_tokens"
    try:
        while len(history) < gen.max_new_tokens:
            if stop_event is not None and stop_event.is_set():
                stats.stop_reason = "stopped"
                break
            hist = torch.tensor(history, dtype=torch.long) if gen.repetition_penalty != 1.0 else None
            token = sampler(logits, hist, None if mask is None else mask.allowed(logits.shape[-1]))
            if t_first is None:
                t_first = time.perf_counter()
                stats.ttft_s = t_first - t0
            if answer.is_eos(token):
                stats.stop_reason = "eos"
                break
            if mask is not None:
                mask.advance(token)
            piece = answer.push(token)
            stats.new_tokens = len(history)
            if piece:
                yield piece
            if answer.stopped:
                stats.stop_reason = "stop_string"
                break
            if mask is not None and mask.done:  # only EOS could follow: end without sampling it
                stats.stop_reason = "eos"
                break
            if len(history) >= gen.max_new_tokens:
                break
            if engine.position + 1 > engine.max_context:
                stats.stop_reason = "context_full"
                break
            logits = engine.step(token)
        rest = answer.finish()
        if rest:
            yield rest
    finally:  # also runs when the consumer stops early (the Stop button, a closed stream)
        t_end = time.perf_counter()
        stats.total_s = t_end - t0
        if t_first is not None and stats.new_tokens > 1:
            stats.decode_tokens_per_s = (stats.new_tokens - 1) / max(t_end - t_first, 1e-9)
        stats.peak_memory_bytes = peak_memory_bytes(device)
