"""Image tokens for calibration: the LLM of a VLM must be calibrated on what it will see.

Visual tokens have very different statistics from text embeddings (larger norms, other
outlier channels); AWQ scales searched on text alone can under-protect the channels they use.
Only the vision tower and projector are loaded here (16-bit, by the loader's own code and
checks), never the whole LLM.
"""

from __future__ import annotations

import torch

from edge_vlm.loader import CheckpointLayout, load_vision, vision_configs
from edge_vlm.preprocess import preprocess


@torch.no_grad()
def image_embeddings(layout: CheckpointLayout, images, device, dtype, batch: int = 8) -> torch.Tensor:
    """Images -> LLM-space tokens [n_images, tokens_per_image, hidden]."""
    parts = load_vision(layout, vision_configs(layout), dtype, device)
    out = []
    for i in range(0, len(images), batch):
        pixels = preprocess(images[i:i + batch], parts.image).to(device=device, dtype=dtype)
        out.append(parts.projector(parts.tower(pixels)))
    return torch.cat(out)
