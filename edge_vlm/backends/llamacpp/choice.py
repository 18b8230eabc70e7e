"""Which backend runs the language model: our torch decoder or llama.cpp.

`llm_backend`:
- "torch": our decoder (the reference; Triton + CUDA graphs on a GPU, torch's int4 matmul on a CPU).
- "llama.cpp": llama.cpp from a GGUF exported once into the cache folder (gguf_cache.py).
- "auto": llama.cpp on the CPU when llama-cpp-python is installed, else torch. On the 2-core AVX2
  machine our loop over llama.cpp decodes SmolLM2 at 82.5 tok/s against 19.4 for the torch int4 path
  (RESULTS.md, one run); on a GPU "auto" keeps torch, whose Triton path is built for it but
  unmeasured (no GPU has run it in this project), and "llama.cpp" (all layers offloaded) stays a choice.
When "auto" picked llama.cpp and the export cannot be made (an architecture or quantization llama.cpp
cannot take), the torch decoder runs instead with one warning line; an explicit "llama.cpp" raises.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

MODES = ("auto", "llama.cpp", "torch")


class LlamaCppFallbackWarning(RuntimeWarning):
    """`llm_backend="auto"` could not use llama.cpp for this model; the torch decoder runs instead."""


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def resolve_llm_backend(requested: str, device: torch.device | str) -> str:
    """"torch" or "llama.cpp" for `requested` (one of MODES) on `device`."""
    if requested != "auto":
        return requested
    if torch.device(device).type != "cpu" or not llama_cpp_installed():
        return "torch"
    return "llama.cpp"


def warn_fallback(reason: str) -> None:
    warnings.warn(f"llama.cpp backend unavailable for this model ({reason}); using the torch decoder",
                  LlamaCppFallbackWarning, stacklevel=3)
