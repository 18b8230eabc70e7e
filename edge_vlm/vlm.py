"""The vision-language model: vision tower -> projector -> LLM, plus what it needs to talk
(tokenizer, chat template, image preprocessing). A text-only LLM is the same object with
no vision tower.

Tiled models (InternVL, NVLM-D) cut each picture into tiles of the tower's size (tiling.py); every
tile is then encoded like one image of a fixed-size model (`tokens_per_image` embeddings each), and
`image_text` says how a picture's tiles are written in the prompt (one `<image>` mark per tile)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from PIL import Image

from .chat_template import IMAGE_MARK, ChatTemplate, image_text
from .formats.configs import ImageConfig
from .models.kv_cache import kv_cache_bytes
from .models.llm import DecoderLM
from .imaging.preprocess import preprocess
from .models.projector import Projector
from .imaging.tiling import TilingConfig, split_tiles, tile_count
from .tokenizer import Tokenizer
from .models.vision import VisionTower


@dataclass
class ModelInfo:
    """What `edge-vlm info` prints and the apps show."""

    path: str
    layout: str  # "vila", "llava", "llm"
    llm_arch: str
    vision_arch: str | None = None
    projector: str | None = None
    quantization: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    llm_backend: str = "torch"  # or "llama.cpp" (the LLM runs from a GGUF export)
    vision_backend: str = "torch"  # or what ONNX Runtime runs it with, e.g. "onnxruntime CPU int8"
    max_tiles: int | None = None  # tiled models (InternVL, NVLM-D): the most tiles an image is cut into
    vision_quantization: str = "none"  # or "int8" (the tower's Linear weights, one scale per row)
    image_preparation: str | None = None  # the image steps in use and where they were read (multimodal only)
    params: dict[str, int] = field(default_factory=dict)
    weight_bytes: int = 0


class VisionLanguageModel:
    def __init__(self, llm: DecoderLM, tokenizer: Tokenizer, template: ChatTemplate, info: ModelInfo,
                 vision: VisionTower | None = None, projector: Projector | None = None,
                 image_cfg: ImageConfig | None = None, max_context: int = 4096):
        self.llm, self.tokenizer, self.template, self.info = llm, tokenizer, template, info
        self.vision, self.projector, self.image_cfg = vision, projector, image_cfg
        self.max_context = max_context
        # llama.cpp backend: the LLM runs from this GGUF; `llm` is then its shape only (meta tensors)
        self.gguf_path: Path | None = None
        self.torch_device: torch.device | None = None  # where our torch modules run when `llm` is not loaded
        # ONNX Runtime vision backend: images -> LLM-space embeddings in its session (backends/onnx)
        self.encoder = None
        # dynamic tiling (InternVL, NVLM-D): None for models that see each picture once
        self.tiling: TilingConfig | None = None
        self.image_format: str | None = None  # how a tiled picture is written: "internvl" or "nvlm"

    # ---- pictures as the LLM sees them --------------------------------------------------

    @staticmethod
    def mark_video_frame(frame: Image.Image) -> Image.Image:
        """Flag a picture as a video frame: tiled models give frames one tile (InternVL's video recipe)."""
        frame.info["edge_vlm_video_frame"] = True
        return frame

    def _tiling_for(self, picture: Image.Image) -> TilingConfig:
        return self.tiling.with_max_tiles(1) if picture.info.get("edge_vlm_video_frame") else self.tiling

    def image_tiles(self, picture: Image.Image) -> list[Image.Image]:
        """What the vision tower encodes for one picture: its tiles, or the picture itself."""
        return split_tiles(picture, self._tiling_for(picture)) if self.tiling else [picture]

    def tile_count(self, picture: Image.Image | None = None) -> int:
        """Tiles of `picture` (None: the most any picture can take)."""
        if self.tiling is None:
            return 1
        if picture is None:
            cfg = self.tiling
            return cfg.max_tiles + (1 if cfg.thumbnail and cfg.max_tiles > 1 else 0)
        return tile_count(*picture.size, self._tiling_for(picture))

    def image_text(self, tiles: int) -> str:
        """A picture of `tiles` tiles in the prompt text, one `<image>` mark per tile's embeddings."""
        return image_text(self.image_format, tiles) if self.image_format else IMAGE_MARK * tiles

    @property
    def device(self) -> torch.device:
        return self.torch_device or self.llm.device

    def new_engine(self, max_context: int | None = None):
        """A fresh prefill/step engine with its own KV cache: llama.cpp over the GGUF, else our
        decoder (CUDA graphs on a GPU with Triton)."""
        ctx = max_context or self.max_context
        if self.gguf_path is not None:
            from .backends.llamacpp.engine import LlamaCppEngine

            return LlamaCppEngine(self.gguf_path, ctx, n_gpu_layers=-1 if self.device.type == "cuda" else 0,
                                  kv_cache_int8=getattr(self.llm, "kv_cache_int8", False))
        from .backends import make_engine

        return make_engine(self.llm, ctx)

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.dtype

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @property
    def tokens_per_image(self) -> int:
        """Embeddings per encoded picture: per tile for tiled models."""
        return self.projector.num_tokens(self.vision.num_tokens) if self.vision else 0

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(self.llm.cfg.eos_token_ids)
        for text in [self.tokenizer.eos_token, *self.template.stop_strings]:
            i = self.tokenizer.token_to_id(text) if text else None
            if i is not None:
                ids.add(i)
        return ids

    @torch.inference_mode()
    def encode_images(self, images) -> torch.Tensor:
        """Images -> LLM-space embeddings [N, tokens_per_image, hidden]."""
        if self.encoder is not None:
            return self.encoder(images)
        pixels = preprocess(images, self.image_cfg).to(self.device)
        # the tower may run in another dtype than the LLM (bf16 on CPUs where that is faster)
        feats = self.vision(pixels.to(_param_dtype(self.vision)))
        return self.projector(feats.to(_param_dtype(self.projector))).to(self.dtype)

    def memory_estimate(self, max_context: int | None = None) -> dict[str, int]:
        """Bytes needed: weights as loaded plus the KV cache at `max_context`."""
        cfg = self.llm.cfg
        ctx = max_context or self.max_context
        kv = kv_cache_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, ctx, self.dtype.itemsize,
                            self.llm.kv_cache_int8)
        weights = weight_bytes(*(m for m in (self.llm, self.vision, self.projector) if m is not None))
        return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def weight_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of `modules`, each tensor once (tied weights share one)."""
    tensors = {id(t): t for m in modules for t in list(m.parameters()) + list(m.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _param_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
