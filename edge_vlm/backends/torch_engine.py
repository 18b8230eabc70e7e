"""`TorchEngine`: the `Engine` contract (contracts.py) on our torch decoder and its static KV cache.
The reference every other engine is tested against; the CUDA-graph engine replaces its `step`."""

from __future__ import annotations

import torch

from ..contracts import Prompt
from ..models.llm import DecoderLM


class TorchEngine:
    """Static-KV-cache inference for one conversation at a time, on our torch decoder."""

    name = "torch"

    def __init__(self, llm: DecoderLM, max_context: int, kv_cache_int8: bool = False):
        """`kv_cache_int8`: the cache holds K and V in int8, one scale per row (models/kv_cache.py)."""
        self.llm = llm
        self.cache = llm.new_cache(max_context, quantized=kv_cache_int8)

    @property
    def device(self) -> torch.device:
        return self.llm.device

    @property
    def position(self) -> int:
        return self.cache.position

    @property
    def max_context(self) -> int:
        return self.cache.max_context

    def embed(self, prompt: Prompt) -> torch.Tensor:
        """The prompt as [1, T, D] input embeddings of the decoder."""
        parts = [p if isinstance(p, torch.Tensor) else self.llm.embed(torch.tensor(p, device=self.device))
                 for p in prompt.pieces()]
        return torch.cat([p.to(self.llm.dtype) for p in parts])[None]

    @torch.inference_mode()
    def prefill(self, prompt: Prompt | torch.Tensor) -> torch.Tensor:
        """Run a prompt (or [1, T, D] embeddings) after what is cached; logits [vocab] for the next token."""
        embeds = prompt if isinstance(prompt, torch.Tensor) else self.embed(prompt)
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
