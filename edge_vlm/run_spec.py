"""`RunSpec`: how a loaded model runs, decided once at load and frozen: where its torch parts compute,
in what dtype, on which LLM backend, with which KV cache, context length and image tiling.

It is what `load_model`'s options become, passed whole to the `VisionLanguageModel`; nothing about how
the model runs is set on it afterwards. A different setting is a different model object
(`VisionLanguageModel.with_run(...)`), sharing the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import EdgeVLMError
from .formats.vila_encoders import S2Config
from .imaging.tiling import TilingConfig


@dataclass(frozen=True)
class RunSpec:
    device: torch.device = torch.device("cpu")  # where our torch modules run (the LLM's too, on torch)
    dtype: torch.dtype = torch.float32  # the LLM's activations and the embeddings it is given
    max_context: int = 4096  # tokens each new engine's KV cache holds
    # llama.cpp backend: the LLM runs from this GGUF; the model's `llm` is then its shape only (meta tensors)
    gguf_path: Path | None = None
    llm_threads: int | None = None  # llama.cpp's CPU threads (None: every core this process may use)
    kv_cache_int8: bool = False  # engines hold K/V in int8 (ours) or Q8_0 (llama.cpp): half of fp16
    # tiled models (InternVL, NVLM-D, NVILA-Lite): how a picture is cut; None: each picture seen once
    tiling: TilingConfig | None = None
    image_format: str | None = None  # how a tiled picture is written: "internvl", "nvlm" or "vila"
    s2: S2Config | None = None  # S2 multi-scale towers (NVILA, VILA1.5-*-s2): scales and tiling

    def __post_init__(self):
        if self.max_context < 1:
            raise EdgeVLMError(f"max_context must be at least 1, not {self.max_context}")
        if self.llm_threads is not None and self.llm_threads < 1:
            raise EdgeVLMError(f"llm_threads must be at least 1, not {self.llm_threads}")
        if (self.tiling is None) != (self.image_format is None):
            raise EdgeVLMError("a tiled model names both its tiling and how its tiles are written (image_format)")

    @property
    def llm_backend(self) -> str:
        return "llama.cpp" if self.gguf_path is not None else "torch"
