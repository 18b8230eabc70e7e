"""Image loading and preprocessing: PIL image -> normalized pixel tensor for the vision tower.

Matches the Hugging Face SigLIP/CLIP image processors (PIL bicubic resize, optional center
crop, rescale by 1/255, normalize) so features equal what the towers were trained on.
`resize_mode` covers the three VLM conventions:
- "resize": squash to a square (SigLIP, VILA1.5 "resize");
- "shortest_edge_crop": resize the short side, center-crop (CLIP, LLaVA-hf);
- "pad": pad to a square with the mean colour first, then as above (LLaVA "pad").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import ImageConfig
from .errors import MediaError

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
    for src in images:
        img = load_image(src)
        if cfg.resize_mode == "pad":
            img = pad_to_square(img, cfg.mean)
        if cfg.resize_mode == "resize":
            img = img.resize((cfg.size, cfg.size), resample=cfg.resample)
            arr = np.asarray(img)
        else:
            img = _resize_short_side(img, cfg.shortest_edge, cfg.resample)
            arr = _center_crop(np.asarray(img), cfg.size)
        x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
        x = (x - np.array(cfg.mean, dtype=np.float32)) / np.array(cfg.std, dtype=np.float32)
        out.append(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))))
    return torch.stack(out)
