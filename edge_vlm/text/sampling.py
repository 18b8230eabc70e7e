"""Next-token selection: greedy, or temperature / top-k / top-p sampling with a repetition penalty.

A seeded `torch.Generator` makes sampled answers reproducible: same seed, same text. An optional
mask of allowed tokens (constrained decoding, edge_vlm/constrained.py) removes the others before
anything else, so the same seed draws the same token whenever the mask allows every token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    repetition_penalty: float = 1.0
    seed: int | None = None


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None = None,
                 allowed: torch.Tensor | None = None) -> int:
        """logits: [vocab] float32; history: ids seen so far (for the repetition penalty);
        allowed: bool [vocab], the only tokens that may be drawn (None: all)."""
        p = self.p
        if allowed is not None:
            logits = logits.detach().float().cpu().masked_fill(~allowed, float("-inf"))
        if p.temperature <= 0 and p.repetition_penalty == 1.0:
            return int(torch.argmax(logits))
        logits = logits.detach().float().cpu().clone()
        history = history.cpu() if history is not None else None
        if p.repetition_penalty != 1.0 and history is not None and history.numel():
            seen = logits[history]
            logits[history] = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits[logits < kth] = float("-inf")
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = sorted_logits.softmax(-1)
            cum = probs.cumsum(-1)
            drop = cum - probs > p.top_p  # keep the smallest prefix whose mass reaches top_p
            sorted_logits[drop] = float("-inf")
            logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
