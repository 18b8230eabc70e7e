"""Next-token selection: greedy, or temperature / top-k / top-p sampling with a repetition penalty.

A seeded `torch.Generator` makes sampled answers reproducible: same seed, same text. An optional
mask of allowed tokens (constrained decoding, edge_vlm/text/constrained.py) removes the others
before anything else, so the same seed draws the same token whenever the mask allows every token.
`GenerationConfig`, what one answer asks for, checks its own values when it is made: the CLI's
flags and the server's request fields meet the same ranges in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Integral, Real

import torch

from ..errors import EdgeVLMError

MAX_STOPS = 16  # stop strings are looked for after every token: a bounded few
SEED_RANGE = (-2**63, 2**63)  # what torch.Generator.manual_seed takes as a signed 64-bit seed


class GenerationConfigError(EdgeVLMError):
    """A GenerationConfig value out of its range. `field` names it (the server reports it under
    the request's own field name); `reason` is the message without the name."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def _shown(value) -> str:
    """A short repr for an error message (a client's value may be a 10**4000 integer or a long text)."""
    if isinstance(value, Integral) and not isinstance(value, bool) and abs(value) >= 10**20:
        return f"a {int(value).bit_length()}-bit integer"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
    record every app and the server build; `sampling()` is the sampler's part of it).

    Its values are checked here, once, when it is made (the CLI, the apps and the server all build
    one): a bad one is a `GenerationConfigError` naming the field."""

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

    def __post_init__(self):
        def number(name, ok, why):
            value = getattr(self, name)
            # `not ok(...)` rather than a negated range: NaN fails every comparison and so is refused
            if isinstance(value, bool) or not isinstance(value, Real) or not ok(value):
                raise GenerationConfigError(name, f"{why}, not {_shown(value)}")

        number("max_new_tokens", lambda v: isinstance(v, Integral) and v >= 1, "a whole number of at least 1")
        number("temperature", lambda v: 0 <= v <= 2, "a number from 0 (greedy) to 2")
        number("top_p", lambda v: 0 < v <= 1, "a number above 0 and at most 1 (1: no limit)")
        number("top_k", lambda v: isinstance(v, Integral) and v >= 0, "a whole number of at least 0 (0: no limit)")
        number("repetition_penalty", lambda v: 0 < v <= 10,
               "a number above 0 and at most 10 (1: off, above 1: repeats less likely)")
        if self.seed is not None:
            number("seed", lambda v: isinstance(v, Integral) and SEED_RANGE[0] <= v < SEED_RANGE[1],
                   "a whole number from -2**63 to 2**63 - 1")
        if isinstance(self.stop, str) or not isinstance(self.stop, (list, tuple)):
            raise GenerationConfigError("stop", f"a list of strings, not {type(self.stop).__name__}")
        if len(self.stop) > MAX_STOPS:
            raise GenerationConfigError("stop", f"up to {MAX_STOPS} strings, not {len(self.stop)}")
        for i, s in enumerate(self.stop):
            if not (isinstance(s, str) and s):
                raise GenerationConfigError("stop", f"non-empty strings (number {i + 1} is {_shown(s)})")

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
