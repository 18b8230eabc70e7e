"""How a checkpoint prepares its images, read as its makers' code reads it.

One reader for every family, so the runtime, `edge-vlm quantize`'s image calibration, the ONNX
export and the server all see the same pixels:

- transformers folders (LLaVA / Nemovision, InternVL `-hf`): the image processor settings are
  found the way `AutoImageProcessor.from_pretrained` finds them — the `image_processor` block
  nested in `processor_config.json` (what transformers >= 5 writes) first, else
  `preprocessor_config.json` (the Hub's older layout) — merged over the defaults of the class the
  settings name (`image_processor_type`, or the model type's own class), then the processor's
  call-time defaults on top (`InternVLProcessor` always calls its image processor with
  `crop_to_patches=True`, whatever the saved settings say);
- VILA: `vision_tower/`'s settings through the processor class VILA hard-codes for the tower
  (SigLIP or CLIP), then VILA's own `image_aspect_ratio` step (squash or pad first);
- InternVL's original layout and NVLM-D: their own code ignores any saved processor file and
  squashes each tile to `force_image_size` with ImageNet mean/std; tiling from `config.json`.

Where a folder keeps no settings at all, the tower's own processor class defaults are assumed at
the tower's image size and `ImagePreparation.assumed` says so (the loader warns once). Settings
that do not give the tower a square picture are refused with one line naming the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .configs import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ImageConfig, TilingConfig
from ..errors import CheckpointError, UnsupportedModelError

HALF = (0.5, 0.5, 0.5)
BICUBIC = 3

# The class-level defaults of transformers' image processors we read (the PIL backends' class
# attributes: models/<name>/image_processing_pil_<name>.py). `default_to_square` says how a bare
# integer `size` is read: False -> the shortest edge, True -> a square.
_CLIP_LIKE = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                  image_mean=CLIP_MEAN, image_std=CLIP_STD, default_to_square=False)
PROCESSOR_DEFAULTS: dict[str, dict] = {
    "CLIPImageProcessor": _CLIP_LIKE,
    "LlavaImageProcessor": {**_CLIP_LIKE, "do_pad": False},
    "SiglipImageProcessor": dict(size={"height": 224, "width": 224}, image_mean=HALF, image_std=HALF,
                                 default_to_square=False),
    "GotOcr2ImageProcessor": dict(size={"height": 384, "width": 384}, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                                  crop_to_patches=False, min_patches=1, max_patches=12, default_to_square=True),
}
_COMMON = dict(do_resize=True, resample=BICUBIC, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
               do_center_crop=False, do_pad=False)
# the class a tower's own processor is (VILA hard-codes it; transformers maps the model type to it)
TOWER_PROCESSOR = {"siglip": "SiglipImageProcessor", "clip": "CLIPImageProcessor",
                   "internvit": "GotOcr2ImageProcessor"}


class ImagePreparationWarning(UserWarning):
    """The checkpoint does not say how its images are prepared; the message says what was assumed."""


@dataclass(frozen=True)
class ImagePreparation:
    """The pixels a model's tower sees: per-picture steps, tiling (None: one picture, one tensor),
    where the facts were read, and what was assumed because the checkpoint does not say."""

    image: ImageConfig
    tiling: TilingConfig | None
    source: str
    assumed: str | None = None

    def describe(self) -> str:
        """One line for `edge-vlm info`."""
        text = self.image.describe()
        if self.tiling is not None:
            t = self.tiling
            text += (f"; tiles of {t.tile_size} px, {t.min_tiles}-{t.max_tiles} a picture"
                     + (" + a thumbnail" if t.thumbnail and t.max_tiles > 1 else "") if t.max_tiles > 1
                     else f"; one {t.tile_size} px tile a picture")
        return f"{text} (from {self.source})"


def settings_image_config(saved: dict, fallback: str = "CLIPImageProcessor") -> ImageConfig:
    """The steps of one saved settings dict (its own `image_processor_type`, else `fallback`)."""
    cls = processor_class(saved, fallback)
    return image_config(merged_settings(saved, cls), cls)


# ------------------------------------------------------------------ finding the settings

def saved_processor_settings(folder: Path) -> tuple[dict | None, str | None]:
    """The image processor settings a folder keeps and the file they came from, found as
    transformers finds them: `processor_config.json`'s nested `image_processor`, then
    `preprocessor_config.json`; (None, None) when there are none."""
    nested = folder / "processor_config.json"
    if nested.is_file():
        block = _json(nested).get("image_processor")
        if isinstance(block, dict):
            return block, f"{_name(nested)} (image_processor)"
    flat = folder / "preprocessor_config.json"
    if flat.is_file():
        return _json(flat), _name(flat)
    return None, None


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _name(path: Path) -> str:
    """`vision_tower/preprocessor_config.json` for a VILA sub-folder, the bare name otherwise."""
    return f"{path.parent.name}/{path.name}" if path.parent.name in ("vision_tower",) else path.name


def processor_class(saved: dict | None, fallback: str) -> str:
    """The image processor class the settings name (its Fast / Pil backends are the same class)."""
    name = (saved or {}).get("image_processor_type") or fallback
    for suffix in ("Fast", "Pil"):
        name = name.removesuffix(suffix)
    if name not in PROCESSOR_DEFAULTS:
        raise UnsupportedModelError(f"unsupported image processor {name!r}; supported: "
                                    f"{', '.join(sorted(PROCESSOR_DEFAULTS))}")
    return name


def merged_settings(saved: dict | None, cls: str, **call_defaults) -> dict:
    """The settings a call of `cls` runs with: its class defaults, the saved ones over them, the
    processor's call-time values over those; sizes in transformers' dict form."""
    s = {**_COMMON, **PROCESSOR_DEFAULTS[cls], **(saved or {}), **call_defaults}
    s["size"] = _size_dict(s["size"], s["default_to_square"], "size")
    if s.get("crop_size") is not None:
        s["crop_size"] = _size_dict(s["crop_size"], True, "crop_size")
    return s


def _size_dict(size, default_to_square: bool, key: str) -> dict:
    """transformers' `get_size_dict`: an int is a square or a shortest edge, a pair is (height, width)."""
    if isinstance(size, dict):
        return size
    if isinstance(size, int):
        return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": size[0], "width": size[1]}
    raise CheckpointError(f"image processor {key} {size!r} is not a size")


# ------------------------------------------------------------------ settings -> our steps

def image_config(s: dict, key_source: str) -> ImageConfig:
    """Merged settings (see `merged_settings`) -> the steps `preprocess` runs."""
    size = s["size"]
    crop = s.get("crop_size") if s.get("do_center_crop") else None
    if not s.get("do_resize", True):
        raise UnsupportedModelError(f"{key_source}: do_resize false is not supported (the tower needs a fixed size)")
    if "shortest_edge" in size:
        if size.get("longest_edge"):
            raise UnsupportedModelError(f"{key_source}: size.longest_edge is not supported")
        resize, resize_to = "shortest_edge", int(size["shortest_edge"])
    elif "height" in size and "width" in size:
        if size["height"] != size["width"]:
            raise UnsupportedModelError(f"{key_source}: a non-square size {size['height']}x{size['width']} is "
                                        "not supported")
        resize, resize_to = "square", int(size["height"])
    else:
        raise UnsupportedModelError(f"{key_source}: unsupported size {size!r}")
    if crop is not None:
        if crop.get("height") != crop.get("width"):
            raise UnsupportedModelError(f"{key_source}: a non-square crop_size {crop!r} is not supported")
        side = int(crop["height"])
    elif resize == "square":
        side = resize_to
    else:
        raise UnsupportedModelError(f"{key_source}: a shortest-edge resize without a centre crop does not give the "
                                    "tower a square picture")
    normalize = s.get("do_normalize", True)
    return ImageConfig(size=side, mean=tuple(s["image_mean"]) if normalize else (0.0, 0.0, 0.0),
                       std=tuple(s["image_std"]) if normalize else (1.0, 1.0, 1.0), resize=resize,
                       resize_to=resize_to, crop=crop is not None, pad_to_square=bool(s.get("do_pad")),
                       resample=int(s.get("resample", BICUBIC)),
                       rescale_factor=float(s["rescale_factor"]) if s.get("do_rescale", True) else 1.0)


def _assumption(cls: str, tower_size: int, folder: Path) -> str:
    return (f"{folder} keeps no image processor settings (processor_config.json or preprocessor_config.json): "
            f"assumed {cls}'s defaults at the tower's {tower_size} px")


def _tower_sized(cls: str, tower_size: int) -> dict:
    """The class defaults with the tower's image size (what a missing settings file is taken to be)."""
    if "shortest_edge" in PROCESSOR_DEFAULTS[cls]["size"]:
        return {"size": {"shortest_edge": tower_size}, "crop_size": {"height": tower_size, "width": tower_size}}
    return {"size": {"height": tower_size, "width": tower_size}}


# ------------------------------------------------------------------ the families

def transformers_preparation(folder: Path, tower_arch: str, tower_size: int, model_type: str) -> ImagePreparation:
    """A transformers VLM folder (model_type `llava` or `internvl`), as its processor class calls
    its image processor."""
    saved, source = saved_processor_settings(folder)
    fallback = "GotOcr2ImageProcessor" if model_type == "internvl" else (
        "LlavaImageProcessor" if saved is not None else TOWER_PROCESSOR[tower_arch])
    cls = processor_class(saved, fallback)
    assumed = None
    if saved is None:
        saved, source = _tower_sized(cls, tower_size), f"{cls} defaults (assumed)"
        assumed = _assumption(cls, tower_size, folder)
    if model_type == "internvl":  # InternVLProcessor's images_kwargs: crop_to_patches=True at every call
        s = merged_settings(saved, cls, crop_to_patches=True)
        image = image_config(s, source)
        tiling = TilingConfig(image.size, int(s["min_patches"]), int(s["max_patches"]) if s["crop_to_patches"] else 1)
        return ImagePreparation(image, tiling, source, assumed)
    return ImagePreparation(image_config(merged_settings(saved, cls), source), None, source, assumed)


def vila_preparation(vision_dir: Path, tower_arch: str, tower_size: int, top: dict) -> ImagePreparation:
    """VILA1.5: the processor class VILA builds for the tower, over `vision_tower/`'s settings; its
    `image_aspect_ratio` "resize" squashes the picture to the processor's square first, "pad" pads
    it to a square with the mean colour first."""
    saved, source = saved_processor_settings(vision_dir)
    cls = TOWER_PROCESSOR[tower_arch]  # VILA names the class itself, whatever the file says
    assumed = None
    if saved is None:
        saved, source = _tower_sized(cls, tower_size), f"{cls} defaults (assumed)"
        assumed = _assumption(cls, tower_size, vision_dir)
    image = image_config(merged_settings(saved, cls), source)
    aspect = top.get("image_aspect_ratio")
    if aspect == "resize":
        image = image.with_squash_first()
    elif aspect == "pad":
        image = image.with_pad_to_square()
    elif aspect in ("dynamic", "dynamic_s2"):
        raise UnsupportedModelError(f"VILA image_aspect_ratio {aspect!r} (tiled images) is not supported; "
                                    "supported: resize, pad, or none (the processor alone)")
    return ImagePreparation(image, None, source + (f", image_aspect_ratio {aspect}" if aspect else ""), assumed)


def internvl_original_preparation(top: dict, tower_size: int) -> ImagePreparation:
    """InternVL's original layout and NVLM-D: their `load_image` squashes every tile to
    `force_image_size` (bicubic) and normalises with ImageNet's mean/std; tiling from config.json."""
    dynamic = top.get("dynamic_image_size", True)
    tiling = TilingConfig(tower_size, int(top.get("min_dynamic_patch", 1)),
                          int(top.get("max_dynamic_patch", 12)) if dynamic else 1, bool(top.get("use_thumbnail", True)))
    image = ImageConfig(size=tower_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize="square", resize_to=tower_size)
    return ImagePreparation(image, tiling, "config.json (the model's own preprocessing)")
