"""Our three decoder architectures in llama.cpp's terms: tensor names, hyperparameter keys and the
weight conventions in which its kernels differ from the Hugging Face checkpoints.

| ours (llm.py)                | GGUF                        | convention                                   |
|------------------------------|-----------------------------|----------------------------------------------|
| embed_tokens                 | token_embd                  |                                              |
| layers.N.input_layernorm     | blk.N.attn_norm (+ .bias)   | Nemotron: weight + 1 (LayerNorm1P -> plain)  |
| layers.N.self_attn.q/k_proj  | blk.N.attn_q / attn_k       | Llama: rows permuted per head (see below)    |
| layers.N.self_attn.v/o_proj  | blk.N.attn_v / attn_output  | Qwen2: q/k/v biases as .bias                 |
| layers.N.post_attention_ln   | blk.N.ffn_norm (+ .bias)    | Nemotron: weight + 1                         |
| layers.N.mlp.gate/up/down    | blk.N.ffn_gate / up / down  | Nemotron has no gate (relu^2)                |
| norm                         | output_norm (+ .bias)       | Nemotron: weight + 1                         |
| lm_head                      | output                      | omitted when tied (Llama, Qwen2 reuse        |
|                              |                             | token_embd); Nemotron requires it: a copy    |
| (Llama 3 RoPE scaling)       | rope_freqs                  | per-frequency divisors, from our rotary.py   |

RoPE: our code (like HF) rotates the pair (x[i], x[i + R/2]) of each head ("rotate_half"). llama.cpp
runs Llama with its NORM rope, which rotates (x[2i], x[2i + 1]); so q and k rows are reordered per
head: new row 2i = old row i, new row 2i + 1 = old row i + R/2 (rows past R, partial rotary, stay).
Qwen2 and Nemotron run with NEOX rope, which is rotate_half: no reordering; Nemotron's partial
rotary is `rope.dimension_count` = R < head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from edge_vlm.formats.configs import LLMConfig
from edge_vlm.errors import UnsupportedModelError
from edge_vlm.models.rotary import inverse_frequencies

GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "nemotron": "nemotron"}


@dataclass
class TensorSource:
    """One GGUF tensor and where it comes from in a DecoderLM."""

    name: str
    module: nn.Module | None  # a Linear / WQLinear / Embedding / Int8Embedding / norm (None: `value`)
    part: str = "weight"  # "weight" or "bias"
    rows: torch.Tensor | None = None  # output-row order (the Llama q/k permutation)
    plus_one: bool = False  # LayerNorm1P's stored delta -> llama.cpp's plain LayerNorm weight
    value: torch.Tensor | None = None  # a computed tensor (rope_freqs)


def rope_pair_rows(num_heads: int, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Row order that turns rotate_half heads into llama.cpp's interleaved-pair heads."""
    half = rotary_dim // 2
    within = torch.arange(head_dim)
    pairs = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)  # 0, R/2, 1, R/2+1, ...
    within[:rotary_dim] = pairs
    return (torch.arange(num_heads)[:, None] * head_dim + within[None, :]).reshape(-1)


def check_supported(cfg: LLMConfig) -> None:
    if cfg.arch not in GGUF_ARCH:
        raise UnsupportedModelError(f"cannot export a {cfg.arch!r} language model to GGUF; "
                                    f"supported: {', '.join(GGUF_ARCH)}")
    kind = (cfg.rope_scaling or {}).get("rope_type")
    if kind == "llama3" and cfg.arch != "llama":
        raise UnsupportedModelError(f"llama.cpp has no Llama-3 RoPE scaling for {cfg.arch}")
    if cfg.arch == "nemotron" and cfg.num_heads * cfg.head_dim != cfg.hidden_size:
        raise UnsupportedModelError("llama.cpp's Nemotron needs num_heads * head_dim == hidden_size")
    if cfg.rotary_dim % 2:
        raise UnsupportedModelError(f"odd rotary dimension {cfg.rotary_dim}")


def write_hparams(writer, cfg: LLMConfig) -> None:
    """The `{arch}.*` keys llama.cpp reads for this architecture."""
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.rotary_dim)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.norm == "layernorm1p":
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def _norm(name: str, module: nn.Module, cfg: LLMConfig) -> list[TensorSource]:
    plus = cfg.norm == "layernorm1p"
    out = [TensorSource(f"{name}.weight", module, plus_one=plus)]
    if getattr(module, "bias", None) is not None:
        out.append(TensorSource(f"{name}.bias", module, "bias"))
    return out


def _linear(name: str, module: nn.Module, rows=None) -> list[TensorSource]:
    out = [TensorSource(f"{name}.weight", module, rows=rows)]
    if getattr(module, "bias", None) is not None:
        out.append(TensorSource(f"{name}.bias", module, "bias", rows=rows))
    return out


def lm_head_is_tied(llm) -> bool:
    weight = getattr(llm.lm_head, "weight", None)
    return weight is not None and weight is getattr(llm.embed_tokens, "weight", None)


def tensor_sources(llm) -> list[TensorSource]:
    """Every tensor of the GGUF file, in order, for a DecoderLM."""
    cfg: LLMConfig = llm.cfg
    permute = cfg.arch == "llama"
    q_rows = rope_pair_rows(cfg.num_heads, cfg.head_dim, cfg.rotary_dim) if permute else None
    k_rows = rope_pair_rows(cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim) if permute else None
    out = [TensorSource("token_embd.weight", llm.embed_tokens)]
    for i, layer in enumerate(llm.layers):
        b, att, mlp = f"blk.{i}", layer.self_attn, layer.mlp
        out += _norm(f"{b}.attn_norm", layer.input_layernorm, cfg)
        out += _linear(f"{b}.attn_q", att.q_proj, q_rows) + _linear(f"{b}.attn_k", att.k_proj, k_rows)
        out += _linear(f"{b}.attn_v", att.v_proj) + _linear(f"{b}.attn_output", att.o_proj)
        out += _norm(f"{b}.ffn_norm", layer.post_attention_layernorm, cfg)
        if mlp.gated:
            out += _linear(f"{b}.ffn_gate", mlp.gate_proj)
        out += _linear(f"{b}.ffn_up", mlp.up_proj) + _linear(f"{b}.ffn_down", mlp.down_proj)
    out += _norm("output_norm", llm.norm, cfg)
    if not lm_head_is_tied(llm) or cfg.arch == "nemotron":  # llama.cpp's Nemotron always reads output
        out.append(TensorSource("output.weight", llm.lm_head))
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        plain = LLMConfig(**{**cfg.__dict__, "rope_scaling": None})
        factors = inverse_frequencies(plain) / inverse_frequencies(cfg)  # llama.cpp divides theta by these
        out.append(TensorSource("rope_freqs.weight", None, value=factors.float()))
    return out
