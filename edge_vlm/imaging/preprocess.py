"""Image loading and preprocessing: PIL image -> normalized pixel tensor for the vision tower.

Runs the steps of an `ImageConfig` (see config.py) with the Hugging Face image processors'
arithmetic (PIL resize on uint8, the shortest-edge size truncated, zero-padded centre crop,
rescale, then normalise in float32), so features equal what the towers were trained on. Which
steps a checkpoint uses is read in image_processor_config.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..formats.configs import ImageConfig
from ..errors import MediaError

# The still-image files every part of edge-vlm accepts (folders of images, drag and drop,
# calibration images): the formats Pillow decodes everywhere.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def load_image(src) -> Image.Image:
    """A path, PIL image or HxWx3 uint8 RGB array -> fully decoded RGB PIL image."""
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, np.ndarray):
        if src.ndim != 3 or src.shape[2] != 3:
            raise MediaError(f"an image array must be HxWx3 RGB, got shape {src.shape}")
        return Image.fromarray(src.astype(np.uint8), "RGB")
    path = Path(src)
    if not path.is_file():
        raise MediaError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: truncated files fail here, not later
            return img.convert("RGB")
    except Image.DecompressionBombError as e:  # a huge image (or a zip bomb): refused before it is decoded
        raise MediaError(f"cannot read image {path}: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"cannot read image {path}: not an image or corrupt ({e})") from None


def pad_to_square(img: Image.Image, mean) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), tuple(int(m * 255) for m in mean))
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def _resize_short_side(img: Image.Image, short: int, resample: int) -> Image.Image:
    w, h = img.size
    if w <= h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    return img.resize(size, resample=resample)


def _center_crop(arr: np.ndarray, side: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if h < side or w < side:  # pad with zeros like the HF processor, then crop
        ph, pw = max(side - h, 0), max(side - w, 0)
        arr = np.pad(arr, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
        h, w = arr.shape[:2]
    top, left = (h - side) // 2, (w - side) // 2
    return arr[top:top + side, left:left + side]


def preprocess(images, cfg: ImageConfig) -> torch.Tensor:
    """List of images (anything `load_image` takes) -> float32 tensor [N, 3, S, S]."""
    out = []
    mean, std = np.array(cfg.mean, dtype=np.float32), np.array(cfg.std, dtype=np.float32)
    for src in images:
        img = load_image(src)
        if cfg.pad_to_square:
            img = pad_to_square(img, cfg.mean)
        if cfg.squash_first:
            img = img.resize((cfg.squash_first, cfg.squash_first), resample=Image.BICUBIC)
        if cfg.resize == "square":
            img = img.resize((cfg.resize_to, cfg.resize_to), resample=cfg.resample)
        else:
            img = _resize_short_side(img, cfg.resize_to, cfg.resample)
        arr = np.asarray(img)
        if cfg.crop:
            arr = _center_crop(arr, cfg.size)
        x = (arr.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
        x = (x - mean) / std
        out.append(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))))
    return torch.stack(out)
