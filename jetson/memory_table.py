"""Which Jetson Orin module fits which VLM: the table in jetson/README.md, computed, not guessed.

Each model is built on the meta device from its published shapes (no download, no weights; the
table in `edge_vlm.benchmarks.shapes` the benchmarks use too), in fp16 and with AWQ int4
(group 128) language-model linears, and sized with
`VisionLanguageModel.memory_estimate`: the same figure `edge-vlm info` prints (weights plus
the fp16 KV cache at the given context). Run: python jetson/memory_table.py [--context 4096]

A second table projects the InternViT models (InternVL3-1B/2B, NVLM-D-72B): the LLM in AWQ int4, the
tower in fp16 or with int8 Linear weights (one fp16 scale per output row: `load_model(vision_int8=True)`,
the tower built here with those very modules), the mlp1 projector in fp16, and the KV cache; the sum is shown.

A third does the same for NVILA (NVILA-Lite-2B, NVILA-8B, NVILA-15B: Qwen2 LLMs, SigLIP-448, the
downsampling projectors; shapes in `edge_vlm.benchmarks.shapes.NVILA_VLMS`), and a fourth says what
`--max-tiles` does to one picture there: tiles through the tower and tokens in the prompt, counted
with the runtime's own tiling functions (imaging/s2_tiling.py for dynamic S2, imaging/tiling.py for
NVILA-Lite) and projector.
"""

from __future__ import annotations

import argparse

import torch

from edge_vlm.benchmarks.shapes import (CAMERA_FRAME, LLM_SHAPES, NVILA_MAX_TILES, NVILA_VLMS, VLMS, llm_config,
                                        meta_llm, meta_vlm)
from edge_vlm.formats.configs import LLMConfig, ProjectorConfig, QuantConfig, TilingConfig, VisionConfig
from edge_vlm.formats.int8_rows import use_int8_linears
from edge_vlm.formats.vila_encoders import S2Config
from edge_vlm.imaging import s2_tiling, tiling
from edge_vlm.models.projector import Projector
from edge_vlm.models.vision import VisionTower
from edge_vlm.vlm import ModelInfo, VisionLanguageModel, weight_bytes

# Orin modules and their unified memory (CPU and GPU share it), in GB as NVIDIA states it.
MODULES = [("Nano 4GB", 4), ("Nano 8GB / NX 8GB", 8), ("NX 16GB", 16), ("AGX 32GB", 32), ("AGX 64GB", 64)]
# Left for L4T (headless), the CUDA context, PyTorch and activations; measure yours with tegrastats.
RESERVE_GB = 2.0
AWQ_INT4 = QuantConfig(bits=4, group_size=128)
# `edge-vlm quantize --quantize-lm-head --quantize-embedding`: for big vocabularies (Nemotron's 256k)
AWQ_INT4_BIG_VOCAB = QuantConfig(bits=4, group_size=128, quantize_lm_head=True, quantize_embedding=True)
WEIGHTS = [("fp16", None, False), ("int4 AWQ", AWQ_INT4, False)]
BIG_VOCAB_WEIGHTS = [("int4 AWQ + int4 lm_head + int8 embeddings", AWQ_INT4_BIG_VOCAB, False),
                     ("the same + int8 KV cache", AWQ_INT4_BIG_VOCAB, True)]
BIG_VOCAB = 100_000  # from here the 16-bit embedding and lm_head are worth shrinking too


def rows(context: int) -> list[tuple[str, str, float]]:
    """(model, weights label, total GB) with memory_estimate's figure at `context` tokens."""
    out = []
    for name, (llm_shape, _, _) in VLMS.items():
        weights = WEIGHTS + (BIG_VOCAB_WEIGHTS if LLM_SHAPES[llm_shape]["vocab_size"] >= BIG_VOCAB else [])
        for label, q, kv_int8 in weights:
            est = meta_vlm(name, q, kv_int8).memory_estimate(context)
            out.append((name, label, est["total"] / 1e9))
    return out


def table(context: int = 4096) -> str:
    head = "| model | weights | memory at " + f"{context} tokens | " + " | ".join(m for m, _ in MODULES) + " |"
    lines = [head, "|" + "---|" * (3 + len(MODULES))]
    for name, label, gb in rows(context):
        fits = ["yes" if gb + RESERVE_GB <= mem else "no" for _, mem in MODULES]
        lines.append(f"| {name} | {label} | {gb:.1f} GB | " + " | ".join(fits) + " |")
    return "\n".join(lines)


# The InternViT models' published shapes (their config.json files). They belong in
# edge_vlm.benchmarks.shapes once that table takes InternViT towers.
QWEN25_VOCAB = 151674  # InternVL3's llm_config vocab_size
INTERNVL_LLMS = {
    "qwen2.5-0.5b": dict(arch="qwen2", vocab_size=QWEN25_VOCAB, hidden_size=896, intermediate_size=4864,
                         num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, norm_eps=1e-6, qkv_bias=True,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(arch="qwen2", vocab_size=QWEN25_VOCAB, hidden_size=1536, intermediate_size=8960,
                         num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, norm_eps=1e-6, qkv_bias=True,
                         tie_word_embeddings=True),
    "qwen2-72b": dict(arch="qwen2", vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80,
                      num_heads=64, num_kv_heads=8, head_dim=128, norm_eps=1e-6, qkv_bias=True),
}
INTERNVIT_300M = dict(arch="internvit", image_size=448, patch_size=14, hidden_size=1024, intermediate_size=4096,
                      num_layers=24, num_heads=16, layer_norm_eps=1e-6, hidden_act="gelu", select_layer=-1,
                      drop_cls=True, norm="layer_norm", qk_norm=False, qkv_bias=True)
INTERNVIT_6B = dict(arch="internvit", image_size=448, patch_size=14, hidden_size=3200, intermediate_size=12800,
                    num_layers=45, num_heads=25, layer_norm_eps=1e-6, hidden_act="gelu", select_layer=-1,
                    drop_cls=True, norm="rms_norm", qk_norm=True, qkv_bias=False)
# name: (LLM, tower, mlp1 middle width: the LLM's hidden ("hidden") or intermediate size (NVLM-D), mlp1 biases,
#        the modules it must fit)
INTERNVL_VLMS = {
    "InternVL3-1B": ("qwen2.5-0.5b", INTERNVIT_300M, "hidden", True),
    "InternVL3-2B": ("qwen2.5-1.5b", INTERNVIT_300M, "hidden", True),
    "NVLM-D-72B": ("qwen2-72b", INTERNVIT_6B, "intermediate", False),
}


def internvl_parts(name: str, context: int, tower_int8: bool) -> dict[str, int]:
    """Bytes of each part of an InternViT VLM: int4 LLM, tower (fp16 or int8), mlp1 (fp16), KV cache."""
    from edge_vlm.formats.int8_rows import use_int8_linears
    from edge_vlm.models.internvit import InternViT
    from edge_vlm.models.projector import Projector
    from edge_vlm.vlm import ModelInfo, VisionLanguageModel, weight_bytes

    llm_shape, tower, mid, bias = INTERNVL_VLMS[name]
    cfg, vcfg = LLMConfig(max_position_embeddings=32768, **INTERNVL_LLMS[llm_shape]), VisionConfig(**tower)
    llm = meta_llm(cfg, AWQ_INT4)
    with torch.device("meta"):
        vision = InternViT(vcfg).to(torch.float16)
        if tower_int8:
            use_int8_linears(vision)  # what load_model(vision_int8=True) runs
        width = cfg.intermediate_size if mid == "intermediate" else cfg.hidden_size
        projector = Projector(ProjectorConfig("mlp1", vcfg.hidden_size, cfg.hidden_size, mid_dim=width,
                                              bias=bias)).to(torch.float16)
    vlm = VisionLanguageModel(llm, None, None, ModelInfo(name, "internvl", "qwen2", "internvit", "mlp1"),
                              vision, projector)
    est = vlm.memory_estimate(context)
    return {"llm": weight_bytes(llm), "vision": weight_bytes(vision),
            "projector": weight_bytes(projector), "kv_cache": est["kv_cache"]}


def parts_table(rows, context: int, projector_label: str) -> str:
    """A per-part table: `rows` of (model, LLM label, tower int8?, bytes of llm / vision / projector /
    kv_cache); "yes" where the sum leaves RESERVE_GB of the module's memory."""
    head = (f"| model | LLM | vision tower | {projector_label} | KV cache at {context} | sum | "
            + " | ".join(m for m, _ in MODULES) + " |")
    lines = [head, "|" + "---|" * (6 + len(MODULES))]
    for name, llm_label, tower_int8, b in rows:
        gb = {k: v / 1e9 for k, v in b.items()}
        total = sum(gb.values())
        fits = ["yes" if total + RESERVE_GB <= mem else "no" for _, mem in MODULES]
        lines.append(f"| {name} | {gb['llm']:.2f} GB ({llm_label}) | {gb['vision']:.2f} GB "
                     f"({'int8' if tower_int8 else 'fp16'}) | {gb['projector']:.2f} GB | "
                     f"{gb['kv_cache']:.2f} GB | {total:.2f} GB | " + " | ".join(fits) + " |")
    return "\n".join(lines)


def internvl_table(context: int = 4096) -> str:
    rows = [(name, "int4 AWQ", int8, internvl_parts(name, context, int8))
            for name in INTERNVL_VLMS for int8 in (False, True)]
    return parts_table(rows, context, "mlp1 fp16")


# ------------------------------------------------------------------ NVILA

# `--quantize-lm-head --quantize-embedding` for NVILA's 152k-token Qwen2 vocabularies (BIG_VOCAB)
NVILA_LLM_WEIGHTS = [("int4 AWQ", AWQ_INT4, (False, True)),
                     ("+ int4 lm_head, int8 embeddings", AWQ_INT4_BIG_VOCAB, (True,))]


def nvila_modules(name: str, tower_int8: bool = False, quantization: QuantConfig = AWQ_INT4):
    """NVILA `name`'s int4 (AWQ g128) LLM, its tower (fp16, or int8 rows as `--vision-int8` loads it) and
    its fp16 projector, on the meta device. The projector's input is the tower's width times the S2 scales
    (NVILA-8B's mm_hidden_size 3456 = 3 x 1152), the tower's own width without S2 (NVILA-Lite)."""
    llm_shape, tower, _, _ = NVILA_VLMS[name]
    cfg, vcfg = llm_config(llm_shape, max_positions=32768), VisionConfig(**tower)
    llm = meta_llm(cfg, quantization)
    with torch.device("meta"):
        vision = VisionTower(vcfg).to(torch.float16)
        if tower_int8:
            use_int8_linears(vision)  # what load_model(vision_int8=True) runs
    return llm, vision, nvila_projector(name)


def nvila_projector(name: str) -> Projector:
    llm_shape, tower, kind, scales = NVILA_VLMS[name]
    in_dim = tower["hidden_size"] * (len(scales) if scales else 1)
    with torch.device("meta"):
        return Projector(ProjectorConfig(kind, in_dim, LLM_SHAPES[llm_shape]["hidden_size"])).to(torch.float16)


def nvila_parts(name: str, context: int, tower_int8: bool, quantization: QuantConfig = AWQ_INT4) -> dict[str, int]:
    """Bytes of each part of NVILA `name`: int4 LLM, tower, projector, the fp16 KV cache at `context`."""
    llm, vision, projector = nvila_modules(name, tower_int8, quantization)
    info = ModelInfo(name, "vila", "qwen2", "siglip", projector.cfg.kind)
    est = VisionLanguageModel(llm, None, None, info, vision, projector).memory_estimate(context)
    return {"llm": weight_bytes(llm), "vision": weight_bytes(vision),
            "projector": weight_bytes(projector), "kv_cache": est["kv_cache"]}


def nvila_table(context: int = 4096) -> str:
    rows = [(name, label, int8, nvila_parts(name, context, int8, q))
            for name in NVILA_VLMS for label, q, towers in NVILA_LLM_WEIGHTS for int8 in towers]
    return parts_table(rows, context, "projector fp16")


def nvila_picture(name: str, max_tiles: int, size: tuple[int, int] | None = CAMERA_FRAME) -> tuple[int, int]:
    """(tiles through the tower, LLM embeddings) for one picture of `size` alone in its message, at
    `max_tiles`; size None: the most any picture takes (one shaped like the largest tile grid). The
    embeddings exclude the "\\n" end token VILA's image encoder appends (text, counted with the prompt)."""
    _, tower, _, scales = NVILA_VLMS[name]
    vcfg = VisionConfig(**tower)
    side, tile = vcfg.image_size // vcfg.patch_size, vcfg.image_size
    projector = nvila_projector(name)
    if scales:
        s2 = S2Config(scales=scales, dynamic=True, resize_output_to_scale_idx=-1, max_tiles=max_tiles)
        grids = s2_tiling.candidate_grids((scales[-1] // tile) ** 2, max_tiles)

        def count(w: int, h: int) -> tuple[int, int]:
            return (s2_tiling.plan_dynamic_s2(w, h, s2).num_tiles,
                    s2_tiling.dynamic_s2_image_tokens(w, h, s2, grid_side=side,
                                                      projector_tokens=projector.num_tokens, end_tokens=0))
    else:
        cfg = TilingConfig(tile, 1, max_tiles)
        grids = tiling.candidate_grids(1, max_tiles)

        def count(w: int, h: int) -> tuple[int, int]:
            n = tiling.tile_count(w, h, cfg)
            return n, n * projector.num_tokens(side * side)
    if size is not None:
        return count(*size)
    return max((count(c * tile, r * tile) for c, r in grids or [(1, 1)]), key=lambda x: x[1])


def nvila_tokens_table() -> str:
    w, h = CAMERA_FRAME
    lines = [f"| model | --max-tiles | tower tiles ({w}x{h}) | image tokens ({w}x{h}) | "
             "most image tokens (any picture) |",
             "|---|---|---|---|---|"]
    for name in NVILA_VLMS:
        for max_tiles, label in ((NVILA_MAX_TILES, f"{NVILA_MAX_TILES} (default)"), (1, "1")):
            tiles, tokens = nvila_picture(name, max_tiles)
            lines.append(f"| {name} | {label} | {tiles} | {tokens} | {nvila_picture(name, max_tiles, None)[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096, help="KV-cache size in tokens (default 4096)")
    context = p.parse_args(argv).context
    print(table(context))
    print()
    print(internvl_table(context))
    print()
    print(nvila_table(context))
    print()
    print(nvila_tokens_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
