"""Perplexity of a language model on a token sequence (the quality measure for quantization)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .llm import DecoderLM


@torch.inference_mode()
def perplexity(llm: DecoderLM, ids, window: int = 512, kv_cache_int8: bool = False) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of `window` tokens.

    Each window is scored on its own (fresh cache), so results do not depend on how far the
    text runs before it; the first token of each window is context only. `kv_cache_int8`: score
    through an int8 K/V cache (what `--kv-cache int8` costs).
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    device = llm.device
    cache = llm.new_cache(window, quantized=kv_cache_int8)
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start:start + window].to(device)
        if chunk.numel() < 2:
            break
        cache.truncate(0)
        logits = llm(llm.embed(chunk[None]), cache, all_logits=True)[0]
        nll = F.cross_entropy(logits[:-1].float(), chunk[1:], reduction="sum")
        total += float(nll)
        count += chunk.numel() - 1
    return math.exp(total / max(count, 1))
