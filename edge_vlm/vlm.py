"""The vision-language model: vision tower -> projector -> LLM, plus what it needs to talk
(tokenizer, chat template, image preprocessing). A text-only LLM is the same object with
no vision tower.

Tiled models (InternVL, NVLM-D) cut each picture into tiles of the tower's size (tiling.py); every
tile is then encoded like one image of a fixed-size model (`tokens_per_image` embeddings each), and
`image_text` says how a picture's tiles are written in the prompt (one `<image>` mark per tile).

S2 models (NVILA's dynamic S2, VILA1.5-*-s2's fixed S2: imaging/s2_tiling.py, models/s2_features.py) see
each picture at several scales; one picture is one `<image>` mark and one block of embeddings, whose
length grows with the picture's tile grid under dynamic S2. NVILA-era checkpoints put the image
encoder's start/end tokens (default: none / "\n") around each block as token ids (`image_wrap_ids`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .backends import SelfCheckReport, make_engine
from .backends.llamacpp.engine import LlamaCppEngine
from .contracts import ImageEncoder
from .formats.configs import ImageConfig
from .errors import EdgeVLMError
from .formats.vila_encoders import ImageEncoderConfig, S2Config, VideoEncoderConfig
from .imaging.preprocess import preprocess
from .imaging.s2_tiling import (
    candidate_grids,
    cut_dynamic_s2,
    dynamic_s2_image_tokens,
    fixed_s2_image_tokens,
    plan_dynamic_s2,
)
from .imaging.tiling import TilingConfig, split_tiles, tile_count
from .imaging.video import FRAME_GROUP, FRAME_POOL, VIDEO_FRAME, frames_of, is_frame_group, is_video_frame, picture_info
from .models.kv_cache import kv_cache_bytes
from .models.llm import DecoderLM
from .models.media_encoders import pool_frames
from .models.projector import Projector
from .models.s2_features import encode_dynamic_s2, fixed_s2_features
from .models.vision import VisionTower
from .run_spec import RunSpec
from .text.templates import IMAGE_MARK, ChatTemplate, image_text
from .text.tokenizer import Tokenizer


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
    s2: str | None = None  # S2 multi-scale models: scales and tiling, one line
    params: dict[str, int] = field(default_factory=dict)
    weight_bytes: int = 0


class VisionLanguageModel:
    """Complete when constructed: its parts, and how it runs (`spec`, a frozen RunSpec). A model that
    runs another way is another object (`with_run`, `replace`), sharing the same weights."""

    def __init__(self, llm: DecoderLM, tokenizer: Tokenizer, template: ChatTemplate, info: ModelInfo,
                 vision: VisionTower | None = None, projector: Projector | None = None,
                 image_cfg: ImageConfig | None = None, spec: RunSpec | None = None,
                 image_encoder: ImageEncoderConfig | None = None, encoder: ImageEncoder | None = None,
                 kernel_report: SelfCheckReport | None = None, video_encoder: VideoEncoderConfig | None = None):
        """`encoder`: what turns pictures into LLM-space embeddings when not our torch tower (ONNX
        Runtime: backends/onnx); `kernel_report`: on CUDA, which fast ops passed their load-time
        check (backends/gpu_path.py), read when engines are made. `video_encoder`: NVILA-era VILA's clip
        settings (frames to sample, the pooling over time and space: models/media_encoders.py)."""
        self.llm, self.tokenizer, self.template, self.info = llm, tokenizer, template, info
        self.vision, self.projector, self.image_cfg = vision, projector, image_cfg
        self.spec = spec or RunSpec(device=llm.device, dtype=llm.dtype)
        self.image_encoder_config = image_encoder
        self.video_encoder_config = video_encoder
        self.encoder = encoder
        self.kernel_report = kernel_report
        enc = image_encoder
        # NVILA-era VILA: token ids before / after each image's embeddings (VILA tokenizes the strings alone)
        self.image_wrap_ids: tuple[list[int], list[int]] = (
            tokenizer.encode(enc.start_tokens) if enc and enc.start_tokens else [],
            tokenizer.encode(enc.end_tokens) if enc and enc.end_tokens else [])
        # what follows a default `<image>` mark in the text: NVILA's "\n" comes from its end tokens instead
        self.image_mark_suffix = "" if enc is not None else "\n"

    def replace(self, **changes) -> VisionLanguageModel:
        """This model with some of its constructor's arguments changed: a new object, the same weights."""
        args = dict(llm=self.llm, tokenizer=self.tokenizer, template=self.template, info=self.info,
                    vision=self.vision, projector=self.projector, image_cfg=self.image_cfg, spec=self.spec,
                    image_encoder=self.image_encoder_config, encoder=self.encoder, kernel_report=self.kernel_report,
                    video_encoder=self.video_encoder_config)
        return VisionLanguageModel(**{**args, **changes})

    def with_run(self, **changes) -> VisionLanguageModel:
        """This model run another way (RunSpec fields: max_context, tiling, kv_cache_int8, ...)."""
        return self.replace(spec=dataclasses.replace(self.spec, **changes))

    # ---- how it runs (the spec's fields, read-only) --------------------------------------

    @property
    def max_context(self) -> int:
        return self.spec.max_context

    @property
    def gguf_path(self) -> Path | None:
        """llama.cpp backend: the GGUF the LLM runs from (`llm` is then its shape only); else None."""
        return self.spec.gguf_path

    @property
    def llm_threads(self) -> int | None:
        return self.spec.llm_threads

    @property
    def tiling(self) -> TilingConfig | None:
        return self.spec.tiling

    @property
    def image_format(self) -> str | None:
        return self.spec.image_format

    @property
    def s2(self) -> S2Config | None:
        return self.spec.s2

    # ---- pictures as the LLM sees them --------------------------------------------------

    @staticmethod
    def mark_video_frame(frame: Image.Image) -> Image.Image:
        """Flag a picture as a video frame: tiled models give frames one tile (InternVL's video recipe),
        dynamic S2 never tiles one, and it does not count as an image of its message."""
        frame.info[VIDEO_FRAME] = True
        return frame

    @property
    def video_frames(self) -> int:
        """Frames sampled from a clip unless the user says: the checkpoint's `num_video_frames` (NVILA), else 8."""
        return self.video_encoder_config.frames if self.video_encoder_config is not None else 8

    def video_pictures(self, frames) -> list[Image.Image]:
        """A clip's frames as its message's pictures, one prompt mark each: every frame, marked as a video frame;
        NVILA-era video encoders that pool (TSPVideoEncoder) give one picture per pooled frame, for each pool
        size in turn, standing for its run of frames (their embeddings are averaged in `encode_images`)."""
        marked = [self.mark_video_frame(f) for f in frames]
        cfg = self.video_encoder_config
        if cfg is None or cfg.pool_sizes == ((1, 1, 1),):
            return marked
        out = []
        for t, h, w in cfg.pool_sizes:
            if len(marked) % t:
                raise EdgeVLMError(f"this model's video encoder averages runs of {t} frames: {len(marked)} frames "
                                   f"do not divide into them; ask for a multiple of {t} frames")
            for i in range(0, len(marked), t):
                group = marked[i].copy()
                group.info.update({FRAME_GROUP: tuple(marked[i:i + t]), FRAME_POOL: (h, w)})  # a copy: a video frame too
                out.append(group)
        return out

    @staticmethod
    def lone_image(pictures) -> bool:
        """Whether a message's pictures hold exactly one image, video frames aside: VILA's models tile an
        image (dynamic S2, NVILA-Lite) only then (`pictures` an int: that many images)."""
        if isinstance(pictures, int):
            return pictures == 1
        return sum(not is_video_frame(p) for p in pictures) == 1

    def _tiling_for(self, picture: Image.Image) -> TilingConfig:
        return self.tiling.with_max_tiles(1) if is_video_frame(picture) else self.tiling

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
        if is_frame_group(picture):
            return 1
        return tile_count(*picture.size, self._tiling_for(picture))

    def _tiled(self, picture: Image.Image, lone: bool) -> bool:
        """Whether `picture` is written as its tiles' marks: every picture of tiled models (InternVL, NVLM-D),
        a lone image of NVILA-Lite (image_format "vila"); never a pooled run of video frames or an S2 picture."""
        if self.tiling is None or self.s2 is not None or is_frame_group(picture):
            return False
        return self.image_format != "vila" or (lone and not is_video_frame(picture))

    def message_tiles(self, pictures) -> list[Image.Image]:
        """What `encode_images` gets for one message's pictures: one entry per prompt mark (S2 models: the
        pictures themselves, as dynamic S2 tiles a picture only when it is the message's only image)."""
        lone = self.lone_image(pictures)
        return [t for p in pictures for t in (self.image_tiles(p) if self._tiled(p, lone) else [p])]

    def mark_counts(self, pictures) -> list[int]:
        """`<image>` marks per picture of a message (`pictures` an int: that many images, each at its most)."""
        if isinstance(pictures, int):
            tiled = self.tiling is not None and self.s2 is None and (self.image_format != "vila" or pictures == 1)
            return [self.tile_count(None) if tiled else 1] * pictures
        lone = self.lone_image(pictures)
        return [self.tile_count(p) if self._tiled(p, lone) else 1 for p in pictures]

    def image_tokens(self, pictures) -> int:
        """Embeddings the pictures of one message take in the prompt (`pictures` an int: that many images, at
        their most); the start/end tokens around them are text and counted with it."""
        if isinstance(pictures, int):
            if self.s2 is None or not self.s2.dynamic or pictures != 1 or not self.s2.tile_single_image:
                return sum(self.mark_counts(pictures)) * self.tokens_per_image
            grids = candidate_grids((self.s2.scales[-1] // self.s2.tile_size) ** 2, self.s2.max_tiles)
            cols, rows = max(grids, key=lambda g: g[0] * g[1], default=(1, 1))
            return self._s2_tokens(cols * self.s2.tile_size, rows * self.s2.tile_size, alone=True)
        lone = self.lone_image(pictures)
        return sum(self._picture_tokens(p, lone) for p in pictures)

    def _picture_tokens(self, picture: Image.Image, lone: bool) -> int:
        if is_frame_group(picture):  # a pooled run of frames: the pooled token grid
            h, w = picture_info(picture)[FRAME_POOL]
            side = math.isqrt(self.tokens_per_image)
            return (side // h) * (side // w)
        if self.s2 is not None and self.s2.dynamic and lone and not is_video_frame(picture) \
                and self.s2.tile_single_image:
            return self._s2_tokens(*picture.size, alone=True)
        return (self.tile_count(picture) if self._tiled(picture, lone) else 1) * self.tokens_per_image

    def _s2_tokens(self, width: int, height: int, alone: bool) -> int:
        side = self.vision.cfg.image_size // self.vision.cfg.patch_size
        return dynamic_s2_image_tokens(width, height, self.s2, grid_side=side,
                                       projector_tokens=self.projector.num_tokens, end_tokens=0, alone=alone)

    def image_text(self, tiles: int, alone: bool = True) -> str:
        """A picture of `tiles` tiles in the prompt text, one `<image>` mark per tile's embeddings; NVILA-Lite
        writes a lone picture's mark as one `<image>\n` per tile, and leaves the marks of several as they are."""
        if self.image_format == "vila":
            return (IMAGE_MARK + "\n") * tiles if alone else IMAGE_MARK * tiles
        return image_text(self.image_format, tiles) if self.image_format else IMAGE_MARK * tiles

    @property
    def device(self) -> torch.device:
        return self.spec.device

    def new_engine(self, max_context: int | None = None):
        """A fresh prefill/step engine with its own KV cache: llama.cpp over the GGUF, else our
        decoder (CUDA graphs on a GPU with Triton)."""
        ctx = max_context or self.max_context
        spec = self.spec
        if spec.gguf_path is not None:
            return LlamaCppEngine(spec.gguf_path, ctx, n_gpu_layers=-1 if self.device.type == "cuda" else 0,
                                  n_threads=spec.llm_threads, kv_cache_int8=spec.kv_cache_int8)
        return make_engine(self.llm, ctx, spec.kv_cache_int8, self.kernel_report)

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.dtype

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @property
    def images_vary_in_length(self) -> bool:
        """Dynamic S2 (NVILA): each picture's embeddings are a block of their own, sized by its tiling,
        which depends on whether it is alone in its message; `encode_images` gives them as a list."""
        return self.s2 is not None and self.s2.dynamic

    @property
    def tokens_per_image(self) -> int:
        """Embeddings per encoded picture: per tile for tiled models; S2 models: a picture not tiled
        (dynamic S2: one of several in a message; see `image_tokens`)."""
        if not self.vision:
            return 0
        if self.s2 is not None:
            side = self.vision.cfg.image_size // self.vision.cfg.patch_size
            if self.s2.dynamic:
                return self._s2_tokens(1, 1, alone=False)
            return fixed_s2_image_tokens(self.s2, grid_side=side, projector_tokens=self.projector.num_tokens,
                                         end_tokens=0)
        return self.projector.num_tokens(self.vision.num_tokens)

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(self.llm.cfg.eos_token_ids)
        for text in [self.tokenizer.eos_token, *self.template.stop_strings]:
            i = self.tokenizer.token_to_id(text) if text else None
            if i is not None:
                ids.add(i)
        return ids

    @torch.inference_mode()
    def encode_images(self, images) -> torch.Tensor | list[torch.Tensor]:
        """Images -> LLM-space embeddings [N, tokens_per_image, hidden]. Dynamic S2 models take the
        pictures of one message and give one [tokens, hidden] block per picture (a list). A pooled run of
        video frames (`video_pictures`) is its frames' embeddings averaged over time and its pool's rows
        and columns (VILA's TSPVideoEncoder)."""
        images = list(images)
        if not any(is_frame_group(p) for p in images):
            return self._encode(images, self.lone_image(images))
        flat = [f for p in images for f in frames_of(p)]
        blocks = iter(list(self._encode(flat, self.lone_image(images))))
        out = []
        for p in images:
            if not is_frame_group(p):
                out.append(next(blocks))
                continue
            frames = torch.stack([next(blocks) for _ in frames_of(p)])
            out.append(pool_frames(frames, (len(frames), *picture_info(p)[FRAME_POOL]))[0])
        same = len({tuple(o.shape) for o in out}) == 1
        return torch.stack(out) if same and not self.images_vary_in_length else out

    def _encode(self, images: list[Image.Image], lone: bool) -> torch.Tensor | list[torch.Tensor]:
        if self.encoder is not None and self.s2 is None:
            return self.encoder(images)
        if self.images_vary_in_length:
            return self._encode_dynamic_s2(images, lone)
        pixels = preprocess(images, self.image_cfg).to(self.device)
        feats = fixed_s2_features(self._tower, pixels, self.s2) if self.s2 is not None else self._tower(pixels)
        return self.projector(feats.to(_param_dtype(self.projector))).to(self.dtype)

    def _tower(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tiles' tower features; S2 models on ONNX Runtime run its tower-only graph here (`encoder`). The
        torch tower may run in another dtype than the LLM (bf16 on CPUs where that is faster)."""
        if self.encoder is not None:
            return self.encoder.encode_pixels(pixels).float()
        return self.vision(pixels.to(_param_dtype(self.vision)))

    def _encode_dynamic_s2(self, pictures, lone: bool) -> list[torch.Tensor]:
        plans = [plan_dynamic_s2(*p.size, self.s2, lone and not is_video_frame(p)) for p in pictures]
        tiles = [t for p, plan in zip(pictures, plans) for t in cut_dynamic_s2(p, plan, self.image_cfg.resample)]
        pixels = preprocess(tiles, self.image_cfg).to(self.device)
        project = lambda x: self.projector(x.to(_param_dtype(self.projector)))  # noqa: E731
        return [b.to(self.dtype) for b in encode_dynamic_s2(self._tower, project, pixels, plans, self.s2)]

    def memory_estimate(self, max_context: int | None = None) -> dict[str, int]:
        """Bytes needed: weights as loaded plus the KV cache at `max_context`."""
        cfg = self.llm.cfg
        ctx = max_context or self.max_context
        kv = kv_cache_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, ctx, self.dtype.itemsize,
                            self.spec.kv_cache_int8)
        weights = weight_bytes(*(m for m in (self.llm, self.vision, self.projector) if m is not None))
        return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def weight_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of `modules`, each tensor once (tied weights share one)."""
    tensors = {id(t): t for m in modules for t in list(m.parameters()) + list(m.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _param_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
