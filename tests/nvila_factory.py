"""Tiny random NVILA / VILA-S2 checkpoint folders in VILA's layout, built with transformers' own classes.

- `make_nvila`: NVILA-8B-like (Qwen2 LLM, SigLIP tower, `dynamic_s2`, image_aspect_ratio dynamic_s2,
  an `mlp_downsample*` projector over C * len(scales) channels, NVILA's image/video encoder keys).
- `make_vila_s2`: VILA1.5-*-s2-like (fixed S2: `s2` true, the old `mlp_downsample`, no NVILA keys).
The tower is 42 px with 14 px patches (a 3x3 grid), so the scales are multiples of 42.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.factories import image_processor, make_llm, make_vision, save_image_processor

TILE = 42
NVILA_SCALES = (42, 84, 126)


def projector_dims(kind: str, m: int, hidden: int) -> list[int]:
    """Output widths of the Linears of VILA's downsampling projectors (base_projector.py), m = mm_hidden."""
    return {"mlp_downsample": [hidden, hidden], "mlp_downsample_2x2_fix": [hidden, hidden],
            "mlp_downsample_3x3_fix": [3 * m, hidden, hidden],
            "mlp_downsample_3x3_s2": [3 * m, m, m // 3, hidden, hidden],
            "mlp_downsample_3x3_s2_new": [4 * m, 2 * m, m, m // 3, hidden, hidden]}[kind]


def vila_downsample_projector(kind: str, m: int, hidden: int, seed: int = 0) -> torch.nn.Sequential:
    """VILA's Sequential: merge (no weights), LayerNorm, Linear, then (GELU, [LayerNorm], Linear) per Linear,
    a LayerNorm before every Linear but the first and the last (3x3 kinds only)."""
    nn = torch.nn
    torch.manual_seed(seed + 2)
    k = 3 if "3x3" in kind else 2
    dims = [k * k * m] + projector_dims(kind, m, hidden)
    mods = [nn.Identity(), nn.LayerNorm(dims[0]), nn.Linear(dims[0], dims[1])]
    for i in range(2, len(dims)):
        mods.append(nn.GELU())
        if k == 3 and i < len(dims) - 1:
            mods.append(nn.LayerNorm(dims[i - 1]))
        mods.append(nn.Linear(dims[i - 1], dims[i]))
    layers = nn.Sequential(*mods)
    with torch.no_grad():
        for name, p in layers.named_parameters():
            p.copy_((1.0 if "weight" in name and p.dim() == 1 else 0.0) + 0.1 * torch.randn(p.shape))
    return layers


def _write(folder: Path, projector: str, top_extra: dict, seed: int, scales) -> tuple:
    folder = Path(folder)
    llm = make_llm(folder / "llm", "qwen2", seed)
    hidden = llm.config.hidden_size
    vision = make_vision("siglip", seed, image_size=TILE, patch_size=14)
    vision.save_pretrained(folder / "vision_tower")
    save_image_processor(folder / "vision_tower", image_processor("siglip", TILE), "hub")
    m = vision.config.hidden_size * len(scales)
    proj = vila_downsample_projector(projector, m, hidden, seed)
    (folder / "mm_projector").mkdir(parents=True)
    save_file({f"layers.{k}": v.contiguous() for k, v in proj.state_dict().items()},
              str(folder / "mm_projector" / "model.safetensors"))
    (folder / "mm_projector" / "config.json").write_text(json.dumps(
        {"architectures": ["MultimodalProjector"], "mm_projector_type": projector, "model_type": "v2l_projector"}))
    top = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "hidden_size": hidden,
           "mm_hidden_size": m, "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch",
           "mm_projector_type": projector, "s2_scales": ",".join(map(str, scales)), "num_video_frames": 8,
           **top_extra}
    (folder / "config.json").write_text(json.dumps(top))
    return llm, vision, proj


def make_nvila(folder: Path, projector: str = "mlp_downsample", seed: int = 0, scales=NVILA_SCALES,
               resize_idx: int = -1, max_tiles: int = 12, **over) -> tuple:
    """An NVILA-8B-like folder (its config keys, as NVILA-8B's config.json has them); returns the
    transformers LLM, SiglipVisionModel and VILA-style projector Sequential it was saved from."""
    top = {"dynamic_s2": True, "s2": False, "image_aspect_ratio": "dynamic_s2", "s2_max_split_size": scales[0],
           "s2_resize_output_to_scale_idx": resize_idx, "max_tiles": max_tiles, "min_tiles": 1,
           "image_encoder": json.dumps({"_target_": "llava.model.encoders.BasicImageEncoder"}),
           "video_encoder": json.dumps({"_target_": "llava.model.encoders.BasicVideoEncoder"}), **over}
    return _write(folder, projector, top, seed, scales)


def make_vila_s2(folder: Path, seed: int = 0, scales=NVILA_SCALES, resize_idx: int = 0) -> tuple:
    """A VILA1.5-*-s2-like folder: fixed S2 over `scales`, tiles of the tower's 42 px, mlp_downsample."""
    top = {"s2": True, "s2_max_split_size": TILE, "s2_resize_output_to_scale_idx": resize_idx,
           "image_aspect_ratio": "resize"}
    return _write(folder, "mlp_downsample", top, seed, scales)


def make_nvila_lite(folder: Path, seed: int = 0, max_tiles: int = 6) -> tuple:
    """An NVILA-Lite-like folder: image_aspect_ratio "dynamic" (InternVL's tiling of a lone image, with a
    thumbnail), no S2, mlp_downsample_3x3_fix over the tower's own width, NVILA's encoder keys."""
    top = {"dynamic_s2": False, "s2": False, "image_aspect_ratio": "dynamic", "min_tiles": 1, "max_tiles": max_tiles,
           "image_encoder": json.dumps({"_target_": "llava.model.encoders.BasicImageEncoder"}),
           "video_encoder": json.dumps({"_target_": "llava.model.encoders.BasicVideoEncoder"})}
    return _write(folder, "mlp_downsample_3x3_fix", top, seed, (TILE,))
