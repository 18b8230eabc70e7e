"""Random-weight models of real shapes, fp16/fp32 or int4 (AutoAWQ layout), built in memory.

The int4 model uses the runtime's `WQLinear` (AutoAWQ GEMM buffers, random nibbles) and then goes
through `optimize_for_device` exactly like a loaded AWQ checkpoint would, so the benchmark
measures the runtime's real dispatch. No quantizer is needed: the integers are random.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from edge_vlm.formats.configs import LLMConfig, VisionConfig
from edge_vlm.formats.int4_formats import pack_triton
from edge_vlm.models.llm import DecoderLM, RMSNorm
from edge_vlm.models.vision import VisionTower

GROUP = 128


def random_awq_linear(k: int, n: int, device, dtype, group: int = GROUP, seed: int = 0) -> nn.Module:
    """The runtime's `WQLinear` (AutoAWQ GEMM buffers) filled with random nibbles and small scales."""
    from edge_vlm.models.quant_linear import WQLinear

    gen = torch.Generator(device=device).manual_seed(seed)
    layer = WQLinear(k, n, group, 4, bias=False, device=device, dtype=dtype)
    layer.qweight.copy_(torch.randint(-2**31, 2**31, layer.qweight.shape, device=device, dtype=torch.int64,
                                      generator=gen).to(torch.int32))
    layer.qzeros.copy_(torch.randint(-2**31, 2**31, layer.qzeros.shape, device=device, dtype=torch.int64,
                                     generator=gen).to(torch.int32))
    # |w| ~ 8 * s: keep activations O(1) through the layers
    layer.scales.copy_(torch.rand(layer.scales.shape, device=device, generator=gen) * (0.25 / k ** 0.5))
    return layer


def _init_(module: nn.Module, seed: int) -> None:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in module.named_parameters(recurse=False):
        if name == "weight" and p.dim() == 1:
            p.data.fill_(1.0 if isinstance(module, RMSNorm) else 0.0)  # LayerNorm1P stores weight - 1
        elif p.dim() == 2:
            rows = torch.randn(p.shape, generator=gen) * (p.shape[1] ** -0.5) if p.numel() < 2**27 else None
            if rows is not None:
                p.data.copy_(rows)
            else:  # huge embeddings: fill on the device, chunk by chunk
                p.data.normal_(0.0, p.shape[1] ** -0.5)
        else:
            p.data.zero_()


def build_llm(cfg: LLMConfig, device, dtype, int4: bool, seed: int = 0, int4_lm_head: bool = False,
              int8_embedding: bool = False) -> DecoderLM:
    """A DecoderLM of `cfg` with random weights; decoder linears int4 (AWQ buffers) when `int4`.

    `int4_lm_head` / `int8_embedding` build what `edge-vlm quantize --quantize-lm-head /
    --quantize-embedding` writes (the big-vocabulary settings, e.g. Nemotron's 256k).
    """
    from edge_vlm.models.quant_linear import Int8Embedding

    with torch.device("meta"):
        llm = DecoderLM(cfg)
    targets = [(parent, name, child) for layer in llm.layers for parent in (layer.self_attn, layer.mlp)
               for name, child in parent.named_children() if isinstance(child, nn.Linear)] if int4 else []
    if int4_lm_head:
        targets.append((llm, "lm_head", llm.lm_head))
    for parent, name, child in targets:  # drop the dense weights before materialising: they never take memory
        setattr(parent, name, nn.Identity())
    if int8_embedding:
        llm.embed_tokens = nn.Identity()
    llm.to_empty(device=device)
    for mod in llm.modules():
        _init_(mod, seed)
    for i, (parent, name, child) in enumerate(targets):
        group = GROUP if child.in_features % GROUP == 0 else 32  # 32: the tiny test shape
        setattr(parent, name, random_awq_linear(child.in_features, child.out_features, device, dtype, group, seed + i))
    if int8_embedding:
        emb = Int8Embedding(cfg.vocab_size, cfg.hidden_size, device, dtype)
        gen = torch.Generator(device=device).manual_seed(seed)
        emb.qweight.copy_(torch.randint(-127, 128, emb.qweight.shape, device=device, generator=gen, dtype=torch.int8))
        emb.scales.copy_(torch.rand(emb.scales.shape, device=device, generator=gen) * (0.02 / 127) + 1e-4)
        llm.embed_tokens = emb
    llm.to(dtype)
    llm._rope = None  # rope tables were built (if at all) on meta
    return llm.eval()


def build_vision(cfg: VisionConfig, device, dtype, seed: int = 0) -> VisionTower:
    with torch.device("meta"):
        tower = VisionTower(cfg)
    tower.to_empty(device=device)
    for mod in tower.modules():
        _init_(mod, seed)
    return tower.to(dtype).eval()


def int4_weight_for_bench(k: int, n: int, device, seed: int = 0):
    """A `TritonInt4Weight` of random integers (the kernel benchmark's input)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randint(0, 16, (k, n), device=device, dtype=torch.int32, generator=gen)
    z = torch.randint(0, 16, (k // GROUP, n), device=device, dtype=torch.int32, generator=gen)
    s = (torch.rand((k // GROUP, n), device=device, generator=gen) * 0.01).half()
    return pack_triton(q, z, s, GROUP), (q, z, s)
