"""The runtime's roles, as named contracts: what the generation loop needs from an engine, what
the model needs from an image encoder, what a session needs from a chat template, and what the
apps need from a session (one on a model here, or a server's). Every implementation is checked
against these in tests/runtime/test_contracts.py (methods and their parameters), so a new backend knows
exactly what to provide.

Also the data that cross them: a `Prompt` (token-id chunks with image embedding blocks between
them), built by the session, consumed by every engine; the `GenerationStats` of an answer,
filled by the generation loop and the session, read by every app.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence, runtime_checkable

import torch


@dataclass
class Prompt:
    """The tokens of one prompt: text as token-id chunks, with one image's embeddings between
    each pair of chunks (len(chunks) == images + 1), or ready embeddings as they are."""

    chunks: list[list[int]] = field(default_factory=list)
    # [n_images, tokens_per_image, hidden] in the LLM's dtype, or one [tokens, hidden] block per image (S2)
    images: torch.Tensor | list[torch.Tensor] | None = None
    embeddings: torch.Tensor | None = None  # [1, T, hidden]: already embedded (benchmarks, references)

    def __len__(self) -> int:
        if self.embeddings is not None:
            return self.embeddings.shape[1]
        images = 0 if self.images is None else sum(block.shape[0] for block in self.images)
        return sum(len(c) for c in self.chunks) + images

    def pieces(self) -> Iterator[list[int] | torch.Tensor]:
        """Token-id lists and [n, hidden] embedding blocks, in prompt order (empty chunks left out)."""
        if self.embeddings is not None:
            yield self.embeddings[0]
            return
        for i, ids in enumerate(self.chunks):
            if ids:
                yield ids
            if self.images is not None and i < len(self.images):
                yield self.images[i]


class Keep(enum.Enum):
    """The type of `KEEP`: a default that means "leave it as it is" where None means "none"."""

    KEEP = "keep"


KEEP = Keep.KEEP  # reset(system=KEEP): the session keeps its system prompt (None would remove it)


@dataclass
class GenerationStats:
    """What one answer cost and why it ended."""

    prompt_tokens: int = 0  # prompt tokens run for this answer (after the cached ones)
    new_tokens: int = 0
    ttft_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_s: float = 0.0
    peak_memory_bytes: int = 0
    # eos | stop_string | max_new_tokens | context_full | stopped. Under a constraint, "eos" means the
    # answer is a complete match (the grammar ended it, or the model chose EOS where the grammar may end);
    # any other reason means the answer was cut short and may not parse (a half-written JSON object)
    stop_reason: str = ""
    cached_prompt_tokens: int = 0  # tokens of earlier turns reused from the KV cache, not run again
    backend: str = "torch"  # what ran the language model (torch, llama.cpp)
    vision_backend: str = ""  # what ran the vision tower, for multimodal models (torch, onnxruntime ...)
    vision_s: float = 0.0  # time spent getting the pictures' embeddings (the tower, or a cache of them)

    def summary(self) -> str:
        return (f"{self.prompt_tokens} prompt tokens, {self.new_tokens} generated; time to first token "
                f"{self.ttft_s * 1000:.0f} ms, decode {self.decode_tokens_per_s:.1f} tok/s, "
                f"peak memory {self.peak_memory_bytes / 2**30:.2f} GiB; LLM on {self.backend}"
                + (f", vision on {self.vision_backend}" if self.vision_backend else ""))


@runtime_checkable
class Engine(Protocol):
    """One conversation's KV cache and the two model calls over it. `generate` drives any engine:
    our torch decoder (backends/torch_engine.py), its CUDA-graph replay (backends/triton), llama.cpp
    (backends/llamacpp). Logits come back as a [vocab] float tensor on any device."""

    name: str  # what runs the language model, for the stats line ("torch", "llama.cpp")

    @property
    def device(self) -> torch.device: ...

    @property
    def position(self) -> int:
        """Tokens in the cache."""

    @property
    def max_context(self) -> int:
        """Cache cells: the most tokens a conversation can hold."""

    def prefill(self, prompt: Prompt | torch.Tensor) -> torch.Tensor:
        """Run a prompt (or [1, T, D] input embeddings) after what is cached; logits for the next token."""

    def step(self, token_id: int) -> torch.Tensor:
        """Feed one sampled token; logits for the next."""

    def rewind(self, position: int) -> None:
        """Forget the cached tokens after `position` (0: everything)."""

    def reset(self) -> None: ...


@runtime_checkable
class ImageEncoder(Protocol):
    """Pictures -> LLM-space embeddings [N, tokens_per_image, hidden] in the LLM's dtype and on its
    device: the model's own preprocessing, then the tower and projector. The torch modules, ONNX
    Runtime (backends/onnx/encoder.py) and the server's embedding cache (apps/server/image_cache.py)
    each provide it. Models whose pictures take different numbers of tokens (NVILA's dynamic S2)
    give one [tokens, hidden] block per picture instead (a list)."""

    def __call__(self, images: Sequence) -> torch.Tensor: ...


@runtime_checkable
class ChatFormatter(Protocol):
    """Messages -> prompt text, as the checkpoint's chat template writes it (text/templates.py)."""

    name: str
    stop_strings: list[str]

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools=None,
               documents=None) -> str: ...

    def continuation(self, history: list[dict], user, tools=None, documents=None) -> str:
        """The text after the last cached answer in `history` when `user` speaks next."""


@runtime_checkable
class Session(Protocol):
    """A conversation the apps ask questions in: `ChatSession` on a model loaded here, or
    `RemoteSession` on a running `edge-vlm serve` (apps/camera/remote.py)."""

    system: str | None  # the system prompt

    @property
    def stats(self) -> GenerationStats:
        """What the last answer cost and why it ended."""

    def reset(self, system: str | None | Keep = KEEP) -> None:
        """Start a new conversation (optionally with a new system prompt)."""

    def ask(self, text: str, images: Sequence = (), gen=None,
            stop_event: threading.Event | None = None) -> Iterator[str]:
        """Stream the answer to `text` about `images` (PIL images or RGB arrays) with the sampling
        settings `gen` (a GenerationConfig; None: the defaults), until `stop_event` is set."""
