"""Image tokens for calibration: the LLM of a VLM must be calibrated on what it will see.

Visual tokens have very different statistics from text embeddings (larger norms, other
outlier channels); AWQ scales searched on text alone can under-protect the channels they use.
Only the vision tower and projector are loaded here (16-bit, by the loader's own code and
checks), never the whole LLM.

Tiled models (InternVL, NVLM-D) see an image as the runtime shows it: cut into tiles by our
tiling, each tile's embeddings inside the model's image format (`<img>`...`</img>`, or NVLM-D's
tile tags), the tags embedded by the LLM's own table. An image gets the most tiles (up to the
checkpoint's maximum) whose tokens fit the calibration budget: 256 tokens a 448 px tile, so a
`--seqlen 512` run sees one tile per image and `--seqlen 2048` up to six plus the thumbnail.
"""

from __future__ import annotations

from typing import Callable

import torch

from edge_vlm.chat_template import IMAGE_MARK, image_text
from edge_vlm.formats.layout import CheckpointLayout
from edge_vlm.loading import load_vision
from edge_vlm.formats.vision_configs import vision_configs
from edge_vlm.imaging.preprocess import load_image, preprocess
from edge_vlm.imaging.tiling import split_tiles, tile_count
from edge_vlm.tokenizer import Tokenizer


@torch.no_grad()
def image_embeddings(layout: CheckpointLayout, images, device, dtype, batch: int = 8) -> torch.Tensor:
    """Images -> LLM-space tokens [n_images, tokens_per_image, hidden] (fixed-size models: VILA, LLaVA)."""
    parts = load_vision(layout, vision_configs(layout), dtype, device)
    out = []
    for i in range(0, len(images), batch):
        pixels = preprocess(images[i:i + batch], parts.image).to(device=device, dtype=dtype)
        out.append(parts.projector(parts.tower(pixels)))
    return torch.cat(out)


@torch.no_grad()
def image_sequences(layout: CheckpointLayout, images, device, dtype, embed: Callable[[list[int]], torch.Tensor],
                    max_tokens: int) -> tuple[list[torch.Tensor], str]:
    """Each image as the LLM's input rows [T_i, hidden], and a line saying what they hold.

    Fixed-size models: the image's projected tokens. Tiled models: the image's prompt text (the
    format's tags, then a newline, as the runtime writes an image before the question) with every
    tile's embeddings in place of its mark, at the most tiles that fit `max_tokens` (one tile at
    least; the caller refuses a budget even that overflows). `embed(ids)` embeds token ids.
    """
    configs = vision_configs(layout)
    if configs.tiling is None:
        seqs = list(image_embeddings(layout, images, device, dtype))
        return seqs, f"{seqs[0].shape[0]} tokens each"
    parts = load_vision(layout, configs, dtype, device)
    per_tile = parts.projector.num_tokens(parts.tower.num_tokens)
    tok = Tokenizer(layout.llm_dir)
    seqs, counts = [], []
    for src in images:
        img = load_image(src)
        for cap in range(configs.tiling.max_tiles, 0, -1):
            tiling = configs.tiling.with_max_tiles(cap)
            n = tile_count(*img.size, tiling)
            pieces = [tok.encode(p) for p in (image_text(configs.image_format, n) + "\n").split(IMAGE_MARK)]
            if sum(map(len, pieces)) + n * per_tile <= max_tokens:
                break
        tiles = split_tiles(img, tiling)
        pixels = preprocess(tiles, parts.image).to(device=device, dtype=dtype)
        feats = parts.projector(parts.tower(pixels)).to(dtype)
        rows = [embed(pieces[0])]
        for tile, piece in zip(feats, pieces[1:]):
            rows += [tile, embed(piece)]
        seqs.append(torch.cat(rows))
        counts.append(len(tiles))
    return seqs, (f"{'+'.join(map(str, counts))} tiles of {per_tile} tokens in the {configs.image_format} format, "
                  f"each image at the most tiles that fit --seqlen")
