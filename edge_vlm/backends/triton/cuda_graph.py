"""CUDA-graph decode: the whole decode step recorded once, replayed per token.

At batch 1 a decode step is ~10 small kernels per layer, and launching them from Python is
expected to cost more than running them (the usual finding for batch-1 decode; unmeasured here:
no GPU has run this engine in this project). `CUDAGraphEngine` keeps the reference `TorchEngine.prefill` (one call per prompt)
and replaces `step`: it writes the token id and position into static device tensors and
replays a graph of `FusedDecoder.forward`, whose kernels read the position from those tensors
(rotary + KV write at `pos`, attention over `pos + 1` cached tokens). Nothing is allocated
per token, and the static KV cache is the one prefill fills.

Recording is a separate step (`record`: the fused step -> a zero-argument replay returning the
logits): `record_cuda_graph` on CUDA; on CPU tensors there is nothing to record, so the fused
step runs eagerly (through Triton's interpreter: how tests run this engine). Should recording
fail (a driver or Triton version that cannot capture some launch), the engine warns once and
keeps decoding with the plain step: slower, never wrong.

`edge_vlm.backends.make_engine` picks this engine only when the load-time self-check passed
the fused step and its recording (`cuda_graph`, backends/selfcheck.py); on CUDA the first-run
check has passed both in a child process before (backends/first_run.py).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from ..torch_engine import TorchEngine
from .fused_decode import FusedDecoder

Replay = Callable[[], torch.Tensor]


def record_cuda_graph(decoder: FusedDecoder, warmup_steps: int = 2) -> Replay:
    """Capture `decoder.forward` in a CUDA graph; returns its replay (logits in a static buffer)."""
    # Warm-up runs compile the Triton kernels and settle the allocator; they compute the real
    # step (same token, same position), so the cache slot they write is the correct one.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup_steps):
            decoder.forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = decoder.forward()

    def replay() -> torch.Tensor:
        graph.replay()
        return logits

    replay.graph = graph  # kept alive with the replay
    return replay


def record_eager(decoder: FusedDecoder) -> Replay:
    """No graph: the fused step itself, run per token (CPU tensors, through the interpreter)."""
    return decoder.forward


def recorder_for(device: torch.device) -> Callable[[FusedDecoder], Replay]:
    return record_cuda_graph if device.type == "cuda" else record_eager


class CUDAGraphEngine(TorchEngine):
    name = "torch + CUDA graphs"

    def __init__(self, llm, max_context: int, record: Callable[[FusedDecoder], Replay] | None = None,
                 kv_cache_int8: bool = False):
        super().__init__(llm, max_context, kv_cache_int8)
        self.decoder = FusedDecoder(llm, self.cache)
        self.record = record or recorder_for(self.cache.k.device)
        self.replay: Replay | None | bool = None  # None: not recorded yet; False: recording failed, plain steps

    @torch.inference_mode()
    def step(self, token_id: int) -> torch.Tensor:
        if self.replay is False:
            return super().step(token_id)
        pos = self.cache.position
        if pos >= self.cache.max_context:
            raise ValueError(f"position {pos} exceeds the cache size {self.cache.max_context}")
        self.decoder.token.fill_(token_id)
        self.decoder.pos.fill_(pos)
        if self.replay is None:
            try:
                self.replay = self.record(self.decoder)
            except Exception as e:  # noqa: BLE001 - whatever the cause, answering slower beats failing
                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]}); "
                              "decoding without CUDA graphs", RuntimeWarning, stacklevel=2)
                self.replay = False
                return super().step(token_id)  # rewrites slot `pos` the warm-up may have filled
        logits = self.replay()
        self.cache.advance(1)  # the step wrote slot `pos` of every layer
        return logits[0].clone()  # a graph's output buffer is overwritten by the next replay
