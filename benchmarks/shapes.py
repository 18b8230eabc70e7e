"""The one table of real model shapes, from each checkpoint's config.json.

The speed benchmarks build random weights of these shapes (speed depends on shapes, not values);
the Jetson memory table and the quality memory projection size them on the meta device. All of
them read this table, so a published figure never comes from a second copy of a shape.
"""

from __future__ import annotations

import torch

from edge_vlm.formats.configs import LLMConfig, ProjectorConfig, QuantConfig, VisionConfig

# Language models (LLMConfig fields).
LLM_SHAPES: dict[str, dict] = {
    # VILA1.5-3B's language model (Llama; Sheared-LLaMA-2.7B shape)
    "vila1.5-3b": dict(arch="llama", vocab_size=32000, hidden_size=2560, intermediate_size=6912, num_layers=32,
                       num_heads=20, num_kv_heads=20, head_dim=128, norm_eps=1e-5),
    # Nemotron-Mini-4B (Nemovision-4B's LLM): GQA, partial rotary, relu^2 MLP, 256k vocabulary
    "nemotron-mini-4b": dict(arch="nemotron", vocab_size=256000, hidden_size=3072, intermediate_size=9216,
                             num_layers=32, num_heads=24, num_kv_heads=8, head_dim=128, norm_eps=1e-5,
                             partial_rotary_factor=0.5),
    # Llama-3-8B (Llama-3-VILA1.5-8B's LLM)
    "llama-3-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                       num_heads=32, num_kv_heads=8, head_dim=128, norm_eps=1e-5, rope_theta=500000.0),
    # VILA1.5-13B's language model (Vicuna-13B shape)
    "vila1.5-13b": dict(arch="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                        num_heads=40, num_kv_heads=40, head_dim=128, norm_eps=1e-5),
    # NVILA's Qwen2 LLMs (qkv biases, GQA). NVILA-Lite-2B: Qwen2-1.5B (config.json as quoted in
    # ssmforge's docs of `ssmforge arch Qwen/Qwen2-1.5B-Instruct`; tied embeddings)
    "qwen2-1.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                       num_heads=12, num_kv_heads=2, head_dim=128, norm_eps=1e-6, qkv_bias=True,
                       tie_word_embeddings=True),
    # NVILA-8B's llm_cfg (Qwen2-7B shape, vocabulary resized to NVILA's tokenizer): NVIDIA/TensorRT-LLM
    # tests/unittest/_torch/modeling/test_modeling_vila.py, NVILA_8B_CONFIG
    "nvila-8b": dict(arch="qwen2", vocab_size=151648, hidden_size=3584, intermediate_size=18944, num_layers=28,
                     num_heads=28, num_kv_heads=4, head_dim=128, norm_eps=1e-6, rope_theta=1000000.0,
                     qkv_bias=True),
    # Qwen2.5-14B (NVILA-15B's LLM): its config.json as dumped in citsjtu2020/LLM-Prof sglang/Model_Config.md
    "qwen2.5-14b": dict(arch="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_layers=48,
                        num_heads=40, num_kv_heads=8, head_dim=128, norm_eps=1e-5, rope_theta=1000000.0,
                        qkv_bias=True),
    # a few-kB Qwen2 for checking the NVILA benchmarks run (real_size nvila-ttft --tiny); 512 tokens leave
    # room for the byte-level tokenizer's alphabet
    "tiny-qwen2": dict(arch="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, norm_eps=1e-6, qkv_bias=True),
    # a few-kB model for the tests of the benchmark itself (not a speed figure)
    "tiny": dict(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, norm_eps=1e-5),
}

# Vision towers (VisionConfig fields); both feed the projector from their second-last layer.
# SigLIP-so400m/14 at 384 px: the tower of every VILA1.5.
SIGLIP_384 = dict(arch="siglip", image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
                  num_layers=27, num_heads=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
# SigLIP-so400m/14 at 448 px (paligemma-siglip-so400m-patch14-448): NVILA's tower, 32x32 patches a tile
# (NVILA-8B's vision_tower_cfg in the TensorRT-LLM test above).
SIGLIP_448 = dict(SIGLIP_384, image_size=448)
# CLIP ViT-L/14 at 336 px: Nemovision-4B's (NeVA / LLaVA style, CLS dropped).
CLIP_L_336 = dict(arch="clip", image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                  num_layers=24, num_heads=16, layer_norm_eps=1e-5, hidden_act="quick_gelu", drop_cls=True)
TINY_TOWER = dict(arch="siglip", image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=2, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")

# Whole VLMs: (LLM shape, vision tower, projector). VILA1.5's mlp_downsample merges 2x2 patches,
# a LLaVA-style mlp2x_gelu keeps every patch.
VLMS: dict[str, tuple[str, dict, str]] = {
    "VILA1.5-3B": ("vila1.5-3b", SIGLIP_384, "mlp_downsample"),
    "Nemovision-4B": ("nemotron-mini-4b", CLIP_L_336, "mlp2x_gelu"),
    "Llama-3-VILA1.5-8B": ("llama-3-8b", SIGLIP_384, "mlp_downsample"),
    "VILA1.5-13B": ("vila1.5-13b", SIGLIP_384, "mlp_downsample"),
}

TINY_NVILA_LLM = "tiny-qwen2"
TINY_NVILA_TOWER = dict(TINY_TOWER, image_size=42)  # a 3x3 patch grid: the 3x3 merge pads nothing, 2x2 pads

# NVILA (VILA 2.0): (LLM shape, tower, projector, S2 scales or None). NVILA-8B/15B: dynamic S2 over
# 448,896,1344 (features at the last scale, mm_hidden 3 x 1152) and NVILA's mlp_downsample, which is
# the 2x2_fix merge (NVILA-8B's config; NVlabs/VILA scripts/NVILA/stage3_9tile.sh). NVILA-Lite: no S2,
# InternVL-style tiles of 448 px plus a thumbnail (image_aspect_ratio "dynamic") and the 3x3 projector
# (NVlabs/VILA scripts/NVILA-Lite/sft.sh; sglang python/sglang/srt/models/nvila_lite.py). NVILA-15B's own
# config was not found: its S2 and projector are NVILA-8B's (the family's, per VILA's README).
NVILA_S2_SCALES = (448, 896, 1344)
CAMERA_FRAME = (640, 480)  # the 4:3 camera picture the NVILA memory table and TTFT benchmark count with
NVILA_MAX_TILES = 12  # LlavaConfig's default max_tiles (NVILA-8B's config keeps it)
NVILA_VLMS: dict[str, tuple[str, dict, str, tuple[int, ...] | None]] = {
    "NVILA-Lite-2B": ("qwen2-1.5b", SIGLIP_448, "mlp_downsample_3x3_fix", None),
    "NVILA-8B": ("nvila-8b", SIGLIP_448, "mlp_downsample_2x2_fix", NVILA_S2_SCALES),
    "NVILA-15B": ("qwen2.5-14b", SIGLIP_448, "mlp_downsample_2x2_fix", NVILA_S2_SCALES),
}

# The VLM whose tower and projector a benchmark shape runs with; llama-3-8b is benchmarked text-only.
BENCH_VLMS = {"vila1.5-3b": "VILA1.5-3B", "nemotron-mini-4b": "Nemovision-4B", "vila1.5-13b": "VILA1.5-13B"}
# The shapes of the published GPU figures (bench_kernels' default on CUDA, scripts/gpu-figures).
FIGURE_SHAPES = ("vila1.5-3b", "nemotron-mini-4b", "llama-3-8b")


def llm_config(name: str, layers: int | None = None, vocab: int | None = None, max_positions: int = 8192) -> LLMConfig:
    d = dict(LLM_SHAPES[name])
    if layers:
        d["num_layers"] = layers
    if vocab:
        d["vocab_size"] = vocab
    return LLMConfig(max_position_embeddings=max_positions, **d)


def meta_llm(cfg: LLMConfig, quantization: QuantConfig | None = None):
    """The LLM as the loader builds it, in fp16 on the meta device: sized from its shape, no weights."""
    from edge_vlm.models.llm import DecoderLM
    from edge_vlm.models.quant_linear import prepare_quantized

    with torch.device("meta"):
        llm = DecoderLM(cfg).to(torch.float16)
        if quantization:
            prepare_quantized(llm, quantization)  # quantized layers take the model's dtype for their scales
        llm.tie_weights()  # as the loader does: a tied lm_head shares the embedding (Qwen2-1.5B's 0.47 GB)
    return llm


def meta_vlm(name: str, quantization: QuantConfig | None = None, kv_int8: bool = False):
    """A whole VLM of `VLMS` on the meta device, as `meta_llm` (`kv_int8`: as `--kv-cache int8` sizes its cache)."""
    from edge_vlm.models.projector import Projector
    from edge_vlm.models.vision import VisionTower
    from edge_vlm.run_spec import RunSpec
    from edge_vlm.vlm import ModelInfo, VisionLanguageModel

    llm_name, tower, projector_kind = VLMS[name]
    cfg, vcfg = llm_config(llm_name), VisionConfig(**tower)
    llm = meta_llm(cfg, quantization)
    with torch.device("meta"):
        vision = VisionTower(vcfg).to(torch.float16)
        projector = Projector(ProjectorConfig(projector_kind, vcfg.hidden_size, cfg.hidden_size)).to(torch.float16)
    info = ModelInfo(name, "vila", cfg.arch, vcfg.arch, projector_kind)
    spec = RunSpec(device=torch.device("meta"), dtype=llm.dtype, kv_cache_int8=kv_int8)
    return VisionLanguageModel(llm, None, None, info, vision, projector, spec=spec)


VISION_SHAPES: dict[str, dict] = {**{shape: VLMS[vlm][1] for shape, vlm in BENCH_VLMS.items()}, "tiny": TINY_TOWER}


def __getattr__(name: str):
    """IMAGE_TOKENS, the LLM tokens one image of a bench shape becomes, counted by the runtime's own
    tower and projector; built on first use, since modules on the meta device cost seconds and
    `edge-vlm` imports this table for every command."""
    if name != "IMAGE_TOKENS":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    global IMAGE_TOKENS
    IMAGE_TOKENS = {shape: meta_vlm(vlm).tokens_per_image for shape, vlm in BENCH_VLMS.items()}
    return IMAGE_TOKENS


def vision_config(name: str, layers: int | None = None) -> VisionConfig | None:
    if name not in VISION_SHAPES:
        return None
    d = dict(VISION_SHAPES[name])
    if layers:
        d["num_layers"] = layers
    return VisionConfig(**d)


def linear_shapes(name: str) -> list[tuple[str, int, int]]:
    """(label, K, N) of every distinct linear of a decoder layer, plus the LM head."""
    c = llm_config(name)
    q, kv, d, f = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size
    shapes = [("q_proj", d, q), ("k/v_proj", d, kv), ("o_proj", q, d)]
    shapes += [("gate+up", d, 2 * f)] if c.arch == "llama" else [("up_proj", d, f)]
    shapes += [("down_proj", f, d), ("lm_head", d, c.vocab_size)]
    return shapes
