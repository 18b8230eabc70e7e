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

S2 models (NVILA's dynamic S2, VILA1.5-*-s2) are encoded by the runtime's own model code, a
`VisionLanguageModel` whose LLM is its shape only: each image alone in its message, as a chat with one
picture shows it, between the image encoder's start/end tokens; under dynamic S2 at the most tiles
whose tokens fit the budget.
"""

from __future__ import annotations

from typing import Callable

import torch

from edge_vlm.formats.layout import CheckpointLayout
from edge_vlm.formats.vision_configs import VisionConfigs, vision_configs
from edge_vlm.imaging.preprocess import load_image, preprocess
from edge_vlm.imaging.tiling import split_tiles, tile_count
from edge_vlm.loading import load_vision
from edge_vlm.models.llm import DecoderLM
from edge_vlm.run_spec import RunSpec
from edge_vlm.text.templates import IMAGE_MARK, image_text
from edge_vlm.text.tokenizer import Tokenizer
from edge_vlm.vlm import ModelInfo, VisionLanguageModel


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
    if configs.s2 is not None:
        return _s2_sequences(layout, configs, images, device, dtype, embed, max_tokens)
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


def _s2_sequences(layout: CheckpointLayout, configs: VisionConfigs, images, device, dtype, embed,
                  max_tokens: int) -> tuple[list[torch.Tensor], str]:
    parts = load_vision(layout, configs, dtype, device)
    with torch.device("meta"):
        shape = DecoderLM(layout.llm).to(dtype)  # encode_images reads only its dtype
    model = VisionLanguageModel(shape, Tokenizer(layout.llm_dir), None,
                                ModelInfo(str(layout.folder), layout.kind, layout.llm.arch), parts.tower,
                                parts.projector, parts.image, spec=RunSpec(device=device, dtype=dtype, s2=configs.s2),
                                image_encoder=configs.image_encoder)
    start, end = model.image_wrap_ids
    end = end + (model.tokenizer.encode(model.image_mark_suffix) if model.image_mark_suffix else [])
    seqs, counts = [], []
    for src in images:
        img = load_image(src)
        fitted = model
        if configs.s2.dynamic:
            for cap in range(configs.s2.max_tiles, 0, -1):
                fitted = model.with_run(s2=configs.s2.with_max_tiles(cap))
                if len(start) + fitted.image_tokens([img]) + len(end) <= max_tokens:
                    break
        block = fitted.encode_images([img])[0].to(dtype)
        seqs.append(torch.cat([embed(start), block, embed(end)]))  # embed([]) is an empty [0, hidden] block
        counts.append(block.shape[0])
    kind = "dynamic S2" if configs.s2.dynamic else "fixed S2"
    return seqs, (f"{'+'.join(map(str, counts))} tokens ({kind} at scales {','.join(map(str, configs.s2.scales))}), "
                  f"each image alone, at the most tiles that fit --seqlen")
