"""CUDA-graph decode: the whole decode step recorded once, replayed per token.

At batch 1 a decode step is ~10 small kernels per layer; launching them from Python costs more
than running them. `CUDAGraphEngine` keeps the reference `Engine.prefill` (one call per prompt)
and replaces `step`: it writes the token id and position into static device tensors and
replays a graph of `FusedDecoder.forward`, whose kernels read the position from those tensors
(rotary + KV write at `pos`, attention over `pos + 1` cached tokens). Nothing is allocated
per token, and the static KV cache is the one prefill fills.

`edge_vlm.backends.make_engine` picks it on CUDA with Triton. Should capture fail (a driver
or Triton version that cannot record some launch), the engine warns once and keeps decoding
with the plain step over the same fused modules: slower, never wrong.
"""

from __future__ import annotations

import warnings

import torch

from ...generate import Engine
from .fused_decode import FusedDecoder


class CUDAGraphEngine(Engine):
    def __init__(self, llm, max_context: int, warmup_steps: int = 2):
        super().__init__(llm, max_context)
        if self.cache.k.device.type != "cuda":
            raise ValueError("CUDAGraphEngine needs a model on a CUDA device")
        self.decoder = FusedDecoder(llm, self.cache)
        self.warmup_steps = warmup_steps
        self.graph: torch.cuda.CUDAGraph | None | bool = None  # False: capture failed, plain steps
        self.logits: torch.Tensor | None = None

    def _capture(self) -> None:
        # Warm-up runs compile the Triton kernels and settle the allocator; they compute the real
        # step (same token, same position), so the cache slot they write is the correct one.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup_steps):
                self.decoder.forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.decoder.forward()

    @torch.inference_mode()
    def step(self, token_id: int) -> torch.Tensor:
        if self.graph is False:
            return super().step(token_id)
        pos = self.cache.position
        if pos >= self.cache.max_context:
            raise ValueError(f"position {pos} exceeds the cache size {self.cache.max_context}")
        self.decoder.token.fill_(token_id)
        self.decoder.pos.fill_(pos)
        if self.graph is None:
            try:
                self._capture()
            except Exception as e:  # noqa: BLE001 - whatever the cause, answering slower beats failing
                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); "
                              "decoding without CUDA graphs", RuntimeWarning, stacklevel=2)
                self.graph = False
                return super().step(token_id)  # rewrites slot `pos` the warm-up may have filled
        self.graph.replay()
        self.cache.advance(1)  # the captured step wrote slot `pos` of every layer
        return self.logits[0].clone()  # the graph's output buffer is overwritten by the next replay

