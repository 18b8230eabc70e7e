"""Which Jetson Orin module fits which VLM: the table in jetson/README.md, computed, not guessed.

Each model is built on the meta device from its published shapes (no download, no weights),
in fp16 and with AWQ int4 (group 128) language-model linears, and sized with
`VisionLanguageModel.memory_estimate`: the same figure `edge-vlm info` prints (weights plus
the fp16 KV cache at the given context). Run: python jetson/memory_table.py [--context 4096]
"""

from __future__ import annotations

import argparse

import torch

from edge_vlm.config import LLMConfig, ProjectorConfig, VisionConfig
from edge_vlm.llm import DecoderLM
from edge_vlm.projector import Projector
from edge_vlm.quant_linear import prepare_quantized
from edge_vlm.vision import VisionTower
from edge_vlm.vlm import ModelInfo, VisionLanguageModel

# SigLIP-so400m/14 at 384 px, the tower of all VILA1.5 models (feature from the second-last layer)
SIGLIP_384 = dict(arch="siglip", image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
                  num_layers=27, num_heads=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
# CLIP ViT-L/14 at 336 px, Nemovision's tower (LLaVA / NeVA style: second-last layer, CLS dropped)
CLIP_L_336 = dict(arch="clip", image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                  num_layers=24, num_heads=16, layer_norm_eps=1e-5, hidden_act="quick_gelu", drop_cls=True)
MODELS = {  # (language-model shape from the checkpoint's config, vision tower, projector)
    "VILA1.5-3B": (dict(arch="llama", vocab_size=32000, hidden_size=2560, intermediate_size=6912, num_layers=32,
                        num_heads=20, num_kv_heads=20, head_dim=128, norm_eps=1e-5), SIGLIP_384, "mlp_downsample"),
    "Nemovision-4B": (dict(arch="nemotron", vocab_size=256000, hidden_size=3072, intermediate_size=9216,
                           num_layers=32, num_heads=24, num_kv_heads=8, head_dim=128, norm_eps=1e-5,
                           partial_rotary_factor=0.5), CLIP_L_336, "mlp2x_gelu"),
    "Llama-3-VILA1.5-8B": (dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, norm_eps=1e-5),
                           SIGLIP_384, "mlp_downsample"),
    "VILA1.5-13B": (dict(arch="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                         num_heads=40, num_kv_heads=40, head_dim=128, norm_eps=1e-5), SIGLIP_384, "mlp_downsample"),
}
# Orin modules and their unified memory (CPU and GPU share it), in GB as NVIDIA states it.
MODULES = [("Nano 4GB", 4), ("Nano 8GB / NX 8GB", 8), ("NX 16GB", 16), ("AGX 32GB", 32), ("AGX 64GB", 64)]
# Left for L4T (headless), the CUDA context, PyTorch and activations; measure yours with tegrastats.
RESERVE_GB = 2.0
AWQ_INT4 = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}
# `edge-vlm quantize --quantize-lm-head --quantize-embedding`: for big vocabularies (Nemotron's 256k)
AWQ_INT4_BIG_VOCAB = {**AWQ_INT4, "quantize_lm_head": True, "quantize_embedding": True}
WEIGHTS = [("fp16", None, False), ("int4 AWQ", AWQ_INT4, False)]
BIG_VOCAB_WEIGHTS = [("int4 AWQ + int4 lm_head + int8 embeddings", AWQ_INT4_BIG_VOCAB, False),
                     ("the same + int8 KV cache", AWQ_INT4_BIG_VOCAB, True)]
BIG_VOCAB = 100_000  # from here the 16-bit embedding and lm_head are worth shrinking too


def build(name: str, quantization: dict | None, kv_int8: bool = False) -> VisionLanguageModel:
    """The model as the loader would build it, on the meta device, in fp16 (`kv_int8`: as
    `--kv-cache int8` sizes its cache)."""
    llm_shape, vision_shape, projector_kind = MODELS[name]
    cfg = LLMConfig(**llm_shape)
    vcfg = VisionConfig(**vision_shape)
    with torch.device("meta"):
        llm = DecoderLM(cfg).to(torch.float16)
        if quantization:
            prepare_quantized(llm, quantization)
        vision = VisionTower(vcfg).to(torch.float16)
        projector = Projector(ProjectorConfig(projector_kind, vcfg.hidden_size, cfg.hidden_size)).to(torch.float16)
    llm.kv_cache_int8 = kv_int8
    info = ModelInfo(name, "vila", cfg.arch, vcfg.arch, projector_kind)
    return VisionLanguageModel(llm, None, None, info, vision, projector)


def rows(context: int) -> list[tuple[str, str, float]]:
    """(model, weights label, total GB) with memory_estimate's figure at `context` tokens."""
    out = []
    for name, (llm_shape, _, _) in MODELS.items():
        weights = WEIGHTS + (BIG_VOCAB_WEIGHTS if llm_shape["vocab_size"] >= BIG_VOCAB else [])
        for label, q, kv_int8 in weights:
            est = build(name, q, kv_int8).memory_estimate(context)
            out.append((name, label, est["total"] / 1e9))
    return out


def table(context: int = 4096) -> str:
    head = "| model | weights | memory at " + f"{context} tokens | " + " | ".join(m for m, _ in MODULES) + " |"
    lines = [head, "|" + "---|" * (3 + len(MODULES))]
    for name, label, gb in rows(context):
        fits = ["yes" if gb + RESERVE_GB <= mem else "no" for _, mem in MODULES]
        lines.append(f"| {name} | {label} | {gb:.1f} GB | " + " | ".join(fits) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096, help="KV-cache size in tokens (default 4096)")
    print(table(p.parse_args(argv).context))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
