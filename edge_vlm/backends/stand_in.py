"""A model's shape family, and a one-layer random model of that family to check kernels on.

Whether a fast op compiles, launches and computes right depends on the shapes and dtypes it is
given, not on the weights' values. So the first-run check (first_run.py) runs in a child process
on a stand-in: the same decoder config with one layer, the same int4 modules and group sizes,
the same embedding kind, dtype and KV-cache kind, with random weights made on the device itself.
The embeddings and lm_head keep their real size (a big vocabulary is a shape a kernel must take);
one layer is enough because all of a model's decoder layers have the same shapes. `edge-vlm
doctor` fills its stand-ins the same way.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn as nn

from ..formats.configs import LLMConfig
from ..models.llm import DecoderLM
from ..models.quant_linear import Int8Embedding, WQLinear

NOT_SHAPES = ("num_layers", "max_position_embeddings", "bos_token_id", "eos_token_ids")  # no kernel sees these
STAND_IN_POSITIONS = 64  # the checks use at most 48 cache positions
_LAYER = re.compile(r"^layers\.\d+\.")


def shape_family(llm: nn.Module, triton: bool, kv_cache_int8: bool = False) -> dict:
    """What the fast ops' shapes depend on, as plain data: the config without the layer count,
    the int4 modules (one decoder layer's names) and their group sizes, the embedding kind, the
    dtype, the KV-cache kind, and whether the Triton kernels are allowed."""
    cfg = {k: v for k, v in dataclasses.asdict(llm.cfg).items() if k not in NOT_SHAPES}
    int4 = {}
    for name, m in llm.named_modules():
        if isinstance(m, WQLinear):
            int4[_LAYER.sub("layers.0.", name)] = m.group_size
    return {"llm": cfg, "int4": dict(sorted(int4.items())),
            "int8_embedding": isinstance(llm.embed_tokens, Int8Embedding),
            "dtype": str(llm.dtype).replace("torch.", ""),
            "kv_cache_int8": bool(kv_cache_int8), "triton": bool(triton)}


def build(family: dict, device: torch.device, seed: int = 0) -> DecoderLM:
    """The one-layer random model of `family` on `device`, built there directly (no CPU copy)."""
    cfg = LLMConfig(**family["llm"], num_layers=1, max_position_embeddings=STAND_IN_POSITIONS)
    dtype = getattr(torch, family["dtype"])
    with torch.device("meta"):
        llm = DecoderLM(cfg).to(dtype)
        for name, group in family["int4"].items():
            linear = llm.get_submodule(name)
            parent, _, child = name.rpartition(".")
            setattr(llm.get_submodule(parent) if parent else llm, child,
                    WQLinear(linear.in_features, linear.out_features, group, 4, linear.bias is not None, dtype=dtype))
        if family["int8_embedding"]:
            llm.embed_tokens = Int8Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
    llm = llm.to_empty(device=device)
    fill_random(llm, seed)
    return llm.eval()


@torch.no_grad()
def fill_random(llm: DecoderLM, seed: int = 0) -> None:
    """Random weights in sensible ranges: any bits for packed nibbles and zero points, small
    positive scales, norms near their identity, small dense weights; drawn on the weights' device."""
    gen = torch.Generator(device=llm.device).manual_seed(seed)
    rms = llm.cfg.norm == "rms"
    for name, t in list(llm.named_parameters()) + list(llm.named_buffers()):  # in place: no temporaries
        if t.dtype == torch.int32:
            t.random_(-2**31, 2**31, generator=gen)
        elif t.dtype == torch.int8:
            t.random_(-127, 128, generator=gen)
        elif name.endswith("scales"):
            t.uniform_(0.002, 0.012, generator=gen)
        elif "norm" in name:
            t.normal_(1.0 if rms and name.endswith("weight") else 0.0, 0.1, generator=gen)
        else:
            t.normal_(0.0, 0.05, generator=gen)
