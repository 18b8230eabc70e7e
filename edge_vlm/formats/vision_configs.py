"""The vision side of a multimodal checkpoint as configs: tower, projector, image preparation and the
tiled-image prompt format, read (and refused where unsupported) before any weight is loaded."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from ..errors import UnsupportedModelError
from .checkpoint import read_json
from .configs import ImageConfig, ProjectorConfig, TilingConfig, VisionConfig
from .image_processor_config import (
    ImagePreparation,
    internvl_original_preparation,
    transformers_preparation,
    vila_preparation,
)
from .layout import CheckpointLayout
from .vila_encoders import ImageEncoderConfig, S2Config, VideoEncoderConfig

NVILA_KEYS = ("dynamic_s2", "image_encoder", "video_encoder")  # written by VILA's NVILA-era code only


class VisionConfigs(NamedTuple):
    """Read apart from the weights, so that load_model refuses a bad config before loading anything."""

    vision: VisionConfig
    projector: ProjectorConfig
    preparation: ImagePreparation  # how pictures become pixels (and tiles, for InternVL / NVLM-D)
    image_format: str | None = None  # how tiled images are written in the prompt ("internvl", "nvlm")
    s2: S2Config | None = None  # VILA's S2 multi-scale features (dynamic: NVILA, fixed: VILA1.5-*-s2)
    image_encoder: ImageEncoderConfig | None = None  # NVILA-era VILA: the text tokens around each image
    video_encoder: VideoEncoderConfig | None = None  # NVILA-era VILA: frames, their pooling and tokens

    @property
    def image(self) -> ImageConfig:
        return self.preparation.image

    @property
    def tiling(self) -> TilingConfig | None:
        return self.preparation.tiling


def vision_configs(layout: CheckpointLayout) -> VisionConfigs:
    """The vision tower, projector and image preparation of a multimodal layout (read, not yet built)."""
    if layout.kind == "internvl":
        return _internvl_configs(layout)
    if layout.kind == "vila":
        vision = VisionConfig.from_vila(layout.config, read_json(layout.vision_dir / "config.json"))
        projector = ProjectorConfig.from_vila(layout.config, read_json(layout.projector_dir / "config.json"),
                                              vision.hidden_size, layout.llm.hidden_size)
        prep = vila_preparation(layout.vision_dir, vision.arch, vision.image_size, layout.config)
        s2 = S2Config.from_vila(layout.config)
        if s2 is not None:
            prep = _s2_preparation(prep, s2, vision.image_size)
        encoder = video = None
        if any(k in layout.config for k in NVILA_KEYS):
            encoder = ImageEncoderConfig.from_vila(layout.config.get("image_encoder"))
            video = VideoEncoderConfig.from_vila(layout.config.get("video_encoder"),
                                                 layout.config.get("num_video_frames", 8))
            if video.sep_tokens is not None:
                raise UnsupportedModelError("video_encoder with sep_tokens is not supported yet (TSPVideoEncoder "
                                            "without sep_tokens is)")
        fmt = "vila" if prep.tiling is not None else None  # one "<image>\n" per tile of a lone picture
        return VisionConfigs(vision, projector, prep, fmt, s2, encoder, video)
    else:
        vision = VisionConfig.from_llava(layout.config)
        projector = ProjectorConfig.from_llava(layout.config, vision.hidden_size, layout.llm.hidden_size)
        prep = transformers_preparation(layout.folder, vision.arch, vision.image_size, "llava")
    return VisionConfigs(vision, projector, prep)


def _s2_preparation(prep: ImagePreparation, s2: S2Config, tower_size: int) -> ImagePreparation:
    """VILA sets its processor's size to the S2 input: the tile side (dynamic) or the largest scale (fixed)."""
    size = s2.tile_size if s2.dynamic else s2.input_size
    if s2.dynamic and size != tower_size:
        raise UnsupportedModelError(f"dynamic S2 tiles of {size} px (s2_scales[0]) do not match the tower's "
                                    f"{tower_size} px")
    if not s2.dynamic and s2.max_split_size != tower_size:
        raise UnsupportedModelError(f"s2_max_split_size {s2.max_split_size} does not match the tower's {tower_size} px")
    image = prep.image.at_side(size)
    kind = "dynamic" if s2.dynamic else "fixed"
    return dataclasses.replace(prep, image=image,
                               source=prep.source + f"; {kind} S2 scales {','.join(map(str, s2.scales))}")


def _internvl_configs(layout: CheckpointLayout) -> VisionConfigs:
    top, llm = layout.config, layout.llm
    if top["model_type"] == "internvl":  # transformers' -hf: tiling from the image processor
        layer = top.get("vision_feature_layer", -1)
        if isinstance(layer, list) or top.get("vision_feature_select_strategy", "default") != "default":
            raise UnsupportedModelError("InternVL checkpoints that keep the CLS token or concatenate several "
                                        "vision layers are not supported")
        vision = VisionConfig.from_internvit(top["vision_config"], select_layer=layer)
        act = top.get("projector_hidden_act", "gelu")
        prep = transformers_preparation(layout.folder, vision.arch, vision.image_size, "internvl")
        if prep.image.size != vision.image_size:
            raise UnsupportedModelError(f"the image processor's {prep.image.size} px tiles do not match the "
                                        f"InternViT tower's {vision.image_size} px")
        mid, bias, fmt = llm.hidden_size, True, "internvl"
    else:
        if top.get("ps_version", "v2") != "v2":
            raise UnsupportedModelError(f"InternVL pixel shuffle {top.get('ps_version')!r} is not supported; "
                                        "supported: v2 (InternVL 1.5 and later)")
        vision = VisionConfig.from_internvit(top["vision_config"], select_layer=top.get("select_layer", -1))
        vision.image_size = top.get("force_image_size") or vision.image_size
        act = "gelu"
        prep = internvl_original_preparation(top, vision.image_size)
        nvlm = top["model_type"] == "NVLM_D"  # its mlp1: no biases, the LLM's intermediate size in the middle
        mid, bias, fmt = (llm.intermediate_size, False, "nvlm") if nvlm else (llm.hidden_size, True, "internvl")
    if act != "gelu":
        raise UnsupportedModelError(f"unsupported projector activation {act!r}")
    projector = ProjectorConfig("mlp1", vision.hidden_size, llm.hidden_size, mid_dim=mid, bias=bias,
                                downsample_ratio=float(top.get("downsample_ratio", 0.5)))
    return VisionConfigs(vision, projector, prep, fmt)


