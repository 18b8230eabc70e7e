"""Generation: prefill the prompt into the static KV cache, then decode one token per step.

`Engine` owns the cache and the two model calls (prefill, step); `generate` drives them
with a sampler, EOS/stop handling and timing. Faster engines (CUDA graphs) replace `step`.
"""

from __future__ import annotations

import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .llm import DecoderLM
from .sampling import Sampler, SamplingParams


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    temperature: float = 0.2  # 0 = greedy
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.seed)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_s: float = 0.0
    peak_memory_bytes: int = 0
    stop_reason: str = ""  # eos | stop_string | max_new_tokens | context_full | stopped

    def summary(self) -> str:
        return (f"{self.prompt_tokens} prompt tokens, {self.new_tokens} generated; time to first token "
                f"{self.ttft_s * 1000:.0f} ms, decode {self.decode_tokens_per_s:.1f} tok/s, "
                f"peak memory {self.peak_memory_bytes / 2**30:.2f} GiB")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA allocation on GPU; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Engine:
    """Static-KV-cache inference for one conversation at a time."""

    def __init__(self, llm: DecoderLM, max_context: int):
        self.llm = llm
        self.cache = llm.new_cache(max_context)

    @property
    def position(self) -> int:
        return self.cache.position

    @property
    def max_context(self) -> int:
        return self.cache.max_context

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        """Run [1, T, D] embeddings after what is cached; logits [vocab] for the next token."""
        return self.llm(embeds, self.cache)[0, -1]

    @torch.inference_mode()
    def step(self, token_id: int) -> torch.Tensor:
        ids = torch.tensor([[token_id]], device=self.llm.device)
        return self.llm(self.llm.embed(ids), self.cache)[0, -1]

    def rewind(self, position: int) -> None:
        """Forget the cached tokens after `position` (0: everything)."""
        self.cache.truncate(position)

    def reset(self) -> None:
        self.rewind(0)


def generate(engine: Engine, prompt_embeds: torch.Tensor, gen: GenerationConfig, eos_ids: set[int],
             stop_event: threading.Event | None = None, stats: GenerationStats | None = None,
             t0: float | None = None) -> Iterator[int]:
    """Yield sampled token ids. The last yielded id is NOT yet in the cache (it was never fed).

    Fills `stats` as it goes: TTFT from `t0` (default: now) to the first sampled token.
    """
    stats = stats if stats is not None else GenerationStats()
    device = engine.llm.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter() if t0 is None else t0
    sampler = Sampler(gen.sampling())
    stats.prompt_tokens = prompt_embeds.shape[1]
    logits = engine.prefill(prompt_embeds)
    history: list[int] = []
    t_first = None
    stats.stop_reason = "max_new_tokens"
    try:
        while len(history) < gen.max_new_tokens:
            if stop_event is not None and stop_event.is_set():
                stats.stop_reason = "stopped"
                break
            hist = torch.tensor(history, dtype=torch.long) if gen.repetition_penalty != 1.0 else None
            token = sampler(logits, hist)
            if t_first is None:
                t_first = time.perf_counter()
                stats.ttft_s = t_first - t0
            if token in eos_ids:
                stats.stop_reason = "eos"
                break
            history.append(token)
            stats.new_tokens = len(history)
            yield token
            if len(history) >= gen.max_new_tokens:
                break
            if engine.position + 1 > engine.max_context:
                stats.stop_reason = "context_full"
                break
            logits = engine.step(token)
    finally:  # also runs when the consumer stops early (stop string, Stop button)
        t_end = time.perf_counter()
        stats.total_s = t_end - t0
        if t_first is not None and stats.new_tokens > 1:
            stats.decode_tokens_per_s = (stats.new_tokens - 1) / max(t_end - t_first, 1e-9)
        stats.peak_memory_bytes = peak_memory_bytes(device)
