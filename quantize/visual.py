"""Image tokens for calibration: the LLM of a VLM must be calibrated on what it will see.

Visual tokens have very different statistics from text embeddings (larger norms, other
outlier channels); AWQ scales searched on text alone can under-protect the channels they use.
Only the vision tower and projector are loaded here (16-bit), never the whole LLM.
"""

from __future__ import annotations

import torch

from edge_vlm.checkpoint import TensorStore, load_into, read_json
from edge_vlm.config import LLMConfig, ProjectorConfig, VisionConfig
from edge_vlm.loader import _build, _rename_projector, _rename_vision
from edge_vlm.preprocess import image_config_from_hf, preprocess, read_preprocessor_config
from edge_vlm.projector import Projector
from edge_vlm.vision import VisionTower


def _vila_parts(folder, top, hidden, dtype, device):
    vcfg = VisionConfig.from_hf(read_json(folder / "vision_tower" / "config.json"),
                                select_layer=top.get("mm_vision_select_layer", -2),
                                select_feature=top.get("mm_vision_select_feature", "cls_patch"))
    pjson = read_json(folder / "mm_projector" / "config.json")
    pcfg = ProjectorConfig(pjson.get("mm_projector_type", top.get("mm_projector_type", "linear")),
                           top.get("mm_hidden_size", vcfg.hidden_size), hidden)
    vision, projector = _build(VisionTower, vcfg), _build(Projector, pcfg)
    load_into(vision, TensorStore(folder / "vision_tower"), _rename_vision("", vcfg.layers_used), dtype, device)
    load_into(projector, TensorStore(folder / "mm_projector"), _rename_projector("", pcfg.kind), dtype, device)
    image_cfg = image_config_from_hf(read_preprocessor_config(folder / "vision_tower"), vcfg.image_size,
                                     top.get("image_aspect_ratio"))
    return vision, projector, image_cfg


def _llava_parts(folder, top, hidden, dtype, device):
    strategy = top.get("vision_feature_select_strategy", "default")
    vcfg = VisionConfig.from_hf(top["vision_config"], select_layer=top.get("vision_feature_layer", -2),
                                select_feature="default" if strategy == "default" else "full")
    pcfg = ProjectorConfig("mlp2x_gelu", vcfg.hidden_size, hidden)
    store = TensorStore(folder)
    new = any(k.startswith("model.vision_tower.") for k in store.keys())
    vision, projector = _build(VisionTower, vcfg), _build(Projector, pcfg)
    load_into(vision, store, _rename_vision("model.vision_tower." if new else "vision_tower.", vcfg.layers_used),
              dtype, device)
    load_into(projector, store, _rename_projector("model.multi_modal_projector." if new else "multi_modal_projector.",
                                                  pcfg.kind), dtype, device)
    image_cfg = image_config_from_hf(read_preprocessor_config(folder), vcfg.image_size, top.get("image_aspect_ratio"))
    return vision, projector, image_cfg


@torch.no_grad()
def image_embeddings(source, images, device, dtype, batch: int = 8) -> torch.Tensor:
    """Images -> LLM-space tokens [n_images, tokens_per_image, hidden]."""
    top = read_json(source.folder / "config.json")
    hidden = LLMConfig.from_hf(source.llm_config).hidden_size
    parts = _vila_parts if source.layout == "vila" else _llava_parts
    vision, projector, image_cfg = parts(source.folder, top, hidden, dtype, device)
    out = []
    for i in range(0, len(images), batch):
        pixels = preprocess(images[i:i + batch], image_cfg).to(device=device, dtype=dtype)
        out.append(projector(vision.eval()(pixels)))
    return torch.cat(out)
