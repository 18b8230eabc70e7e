"""Next-token selection: greedy, or temperature / top-k / top-p sampling with a repetition penalty.

A seeded `torch.Generator` makes sampled answers reproducible: same seed, same text. An optional
mask of allowed tokens (constrained decoding, edge_vlm/constrained.py) removes the others before
anything else, so the same seed draws the same token whenever the mask allows every token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no limit
    repetition_penalty: float = 1.0
    seed: int | None = None


@dataclass
class GenerationConfig:
    """What one answer is asked for: its length, sampling, stop strings and constraint (the one
    record every app and the server build; `sampling()` is the sampler's part of it)."""

    max_new_tokens: int = 512
    temperature: float = 0.2  # 0 = greedy
    top_p: float = 0.9
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # the answer must match: {"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": ...}},
    # a JSON schema dict (NIM's guided_json), a list of choices, or a constrained.Constraint (None: free text)
    constraint: object = None

    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.repetition_penalty, self.seed)


class Drawn:
    """Logits whose token this answer's own sampling has drawn already, elsewhere: the batched
    llama.cpp context draws each lane's token in its decode thread (so N lanes do not each take
    N sets of logits through Python) with a Sampler of the answer's settings and seed, the only
    one that draws for it. `Sampler` hands the token on. `draw` (called on first use) draws a
    token not drawn yet; `logits` are there for anything else."""

    def __init__(self, logits: torch.Tensor, token: int | None = None, draw=None):
        self.logits = logits
        self._token, self._draw = token, draw

    @property
    def token(self) -> int:
        if self._token is None:
            self._token = int(self._draw(self.logits))
        return self._token

    @property
    def shape(self) -> torch.Size:
        return self.logits.shape


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
        allowed: bool [vocab], the only tokens that may be drawn (None: all). `Drawn` logits:
        their token, drawn already by this answer's sampling (never under a mask)."""
        if isinstance(logits, Drawn):
            if allowed is not None:
                raise ValueError("a token drawn elsewhere cannot honour a mask: draw it here")
            return logits.token
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
        # extreme settings (a penalty of 1e-300 divides a logit to inf) must not give NaN probabilities:
        # clamp to finite first, then scale relative to the best, so only the best can reach 0
        finite = torch.finfo(logits.dtype)
        logits = torch.nan_to_num(logits, nan=finite.min, posinf=finite.max, neginf=float("-inf"))
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        best = logits.max()
        logits = (logits - best) / p.temperature  # a tiny temperature gives 0 for the best, -inf elsewhere
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
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:  # nothing drawable: the best token
            return int(torch.argmax(logits))
        return int(torch.multinomial(probs, 1, generator=self.generator))
