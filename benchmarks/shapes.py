"""Model shapes for speed benchmarks (random weights: speed depends on shapes, not values)."""

from __future__ import annotations

from edge_vlm.config import LLMConfig, VisionConfig

LLM_SHAPES: dict[str, dict] = {
    # VILA1.5-3B's language model (Llama; Sheared-LLaMA-2.7B shape)
    "vila1.5-3b": dict(arch="llama", vocab_size=32000, hidden_size=2560, intermediate_size=6912, num_layers=32,
                       num_heads=20, num_kv_heads=20, head_dim=128, norm_eps=1e-5),
    # Nemotron-Mini-4B (Nemovision-4B's LLM): GQA, partial rotary, relu^2 MLP, 256k vocabulary
    "nemotron-mini-4b": dict(arch="nemotron", vocab_size=256000, hidden_size=3072, intermediate_size=9216,
                             num_layers=32, num_heads=24, num_kv_heads=8, head_dim=128, norm_eps=1e-5,
                             partial_rotary_factor=0.5),
    "llama-3-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                       num_heads=32, num_kv_heads=8, head_dim=128, norm_eps=1e-5, rope_theta=500000.0),
    # a few-kB model for the tests of the benchmark itself (not a speed figure)
    "tiny": dict(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, norm_eps=1e-5),
}

# The vision tower each VLM pairs with: SigLIP-so400m/14 at 384 px for VILA1.5-3B, CLIP ViT-L/14
# at 336 px for Nemovision-4B (NeVA / LLaVA style). Llama-3-8B is text-only here.
VISION_SHAPES: dict[str, dict] = {
    "vila1.5-3b": dict(arch="siglip", image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
                       num_layers=27, num_heads=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
    "nemotron-mini-4b": dict(arch="clip", image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                             num_layers=24, num_heads=16, layer_norm_eps=1e-5, hidden_act="quick_gelu",
                             drop_cls=True),
    "tiny": dict(arch="siglip", image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_layers=2,
                 num_heads=2, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
}


def llm_config(name: str, layers: int | None = None, vocab: int | None = None, max_positions: int = 8192) -> LLMConfig:
    d = dict(LLM_SHAPES[name])
    if layers:
        d["num_layers"] = layers
    if vocab:
        d["vocab_size"] = vocab
    return LLMConfig(max_position_embeddings=max_positions, **d)


# LLM tokens one image becomes: VILA1.5's mlp_downsample merges 27x27 SigLIP patches into 14x14;
# a LLaVA-style mlp2x_gelu keeps CLIP-L/336's 24x24 patches.
IMAGE_TOKENS = {"vila1.5-3b": 196, "nemotron-mini-4b": 576}


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
    return [(label, k, n) for label, k, n in shapes]
