"""Checkpoint keys -> our parameter names: renamers for the towers and projectors, and recipes for
tensors that do not map one to one (InternViT's fused qkv and padding heads)."""

from __future__ import annotations

import re

import torch

from ..errors import UnsupportedModelError
from .checkpoint import TensorStore
from .configs import VisionConfig


class DerivedStore:
    """A view of a TensorStore whose tensors are made from the stored ones (split, sliced,
    reshaped) under our names: for checkpoints whose tensors do not map one to one onto ours.
    `recipes[name](fetch)` builds tensor `name` from `fetch(key)`, the stored tensor (or its
    meta-device stand-in, for shapes only)."""

    def __init__(self, store: TensorStore, recipes: dict):
        self.store, self.recipes, self.folder = store, recipes, store.folder

    def keys(self) -> list[str]:
        return list(self.recipes)

    def get(self, name: str) -> torch.Tensor:
        return self.recipes[name](self.store.get)

    def meta(self, name: str) -> torch.Tensor:
        return self.recipes[name](self.store.meta)


def internvit_recipes(store: TensorStore, prefix: str, cfg: VisionConfig) -> dict:
    """Our InternViT names -> how to make them from InternVL's original keys or transformers' -hf ones.

    The original layout fuses q, k and v into `attn.qkv`; NVLM-D's also carries dummy heads (its
    6B tower was padded from 25 to 32 heads for tensor parallelism, with q/k norms over the real
    heads only): only the real heads are kept, and the dummy heads must be dead (their v rows or
    their output columns zero), which is checked when the weights are read.
    """
    keys = set(store.keys())
    d = cfg.hidden_size
    hf = f"{prefix}embeddings.cls_token" in keys
    same = lambda key: lambda fetch: fetch(key)  # noqa: E731
    out = {}
    if hf:
        out["embeddings.class_embedding"] = lambda f: f(f"{prefix}embeddings.cls_token").reshape(d)
        out["embeddings.position_embedding"] = lambda f: f(f"{prefix}embeddings.position_embeddings")[0]
        for what in ("weight", "bias"):
            out[f"embeddings.patch_embedding.{what}"] = same(f"{prefix}embeddings.patch_embeddings.projection.{what}")
        names = {"attention.q_proj": "attn.q_proj", "attention.k_proj": "attn.k_proj",
                 "attention.v_proj": "attn.v_proj", "attention.projection_layer": "attn.proj",
                 "attention.q_norm": "attn.q_norm", "attention.k_norm": "attn.k_norm",
                 "layernorm_before": "norm1", "layernorm_after": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        for key in keys:
            m = re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", key)
            if m and int(m.group(1)) < cfg.layers_used and m.group(2) in names:
                out[f"layers.{m.group(1)}.{names[m.group(2)]}.{m.group(3)}"] = same(key)
            m = re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.lambda_([12])$", key)
            if m and int(m.group(1)) < cfg.layers_used:
                out[f"layers.{m.group(1)}.ls{m.group(2)}"] = same(key)
        return out
    out["embeddings.class_embedding"] = lambda f: f(f"{prefix}embeddings.class_embedding").reshape(d)
    out["embeddings.position_embedding"] = lambda f: f(f"{prefix}embeddings.position_embedding")[0]
    for what in ("weight", "bias"):
        out[f"embeddings.patch_embedding.{what}"] = same(f"{prefix}embeddings.patch_embedding.{what}")
    for i in range(cfg.layers_used):
        src, dst = f"{prefix}encoder.layers.{i}.", f"layers.{i}."
        for key in keys:
            if key.startswith(src) and not key[len(src):].startswith(("attn.qkv.", "attn.proj.weight")):
                rest = key[len(src):]
                if rest.startswith(("attn.q_norm.", "attn.k_norm.")):
                    out[dst + rest] = lambda f, key=key: f(key)[:d]
                else:
                    out[dst + rest] = same(key)
        for what in ["weight"] + (["bias"] if f"{src}attn.qkv.bias" in keys else []):
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{dst}attn.{name}.{what}"] = lambda f, k=f"{src}attn.qkv.{what}", j=j: _qkv_part(f(k), j, d)
        out[f"{dst}attn.proj.weight"] = lambda f, src=src: _proj_real_heads(f, src, d)
    return out


def _qkv_part(qkv: torch.Tensor, j: int, d: int) -> torch.Tensor:
    """Part j (q, k, v) of a fused qkv weight or bias, its real heads only (the first d rows)."""
    return qkv.reshape(3, qkv.shape[0] // 3, *qkv.shape[1:])[j, :d]


def _proj_real_heads(fetch, src: str, d: int) -> torch.Tensor:
    proj = fetch(f"{src}attn.proj.weight")
    if proj.shape[1] > d and proj.device.type != "meta":
        dummy_out = proj[:, d:].abs().max() == 0
        qkv = fetch(f"{src}attn.qkv.weight")
        dummy_v = qkv.reshape(3, qkv.shape[0] // 3, -1)[2, d:].abs().max() == 0
        if not (dummy_out or dummy_v):
            raise UnsupportedModelError(f"{src}attn has padding heads that are not zero: cannot drop them")
    return proj[:, :d]


def rename_vision(prefix: str, layers_used: int):
    """Checkpoint key -> VisionTower name (None: not the tower's, or a layer after the one read)."""
    def rename(key: str):
        if not key.startswith(prefix):
            return None
        rest = key[len(prefix):].replace("vision_model.", "", 1).replace("encoder.layers.", "layers.", 1)
        m = re.match(r"layers\.(\d+)\.", rest)
        if m and int(m.group(1)) >= layers_used:
            return None  # layers after the selected one are never run
        return rest
    return rename


def rename_projector(prefix: str, kind: str):
    """VILA `layers.N`, LLaVA-hf `linear_N`, original LLaVA `mm_projector.N` -> ours."""
    def rename(key: str):
        if not key.startswith(prefix):
            return None
        rest = key[len(prefix):]
        if kind == "mlp1":  # InternVL mlp1 = Sequential(LayerNorm, Linear, GELU, Linear), or -hf names
            m = re.match(r"(\d+|layer_norm|linear_1|linear_2)\.(weight|bias)$", rest)
            part = {"0": "norm", "layer_norm": "norm", "1": "linears.0", "linear_1": "linears.0",
                    "3": "linears.1", "linear_2": "linears.1"}.get(m.group(1)) if m else None
            return f"{part}.{m.group(2)}" if part else None
        m = re.match(r"(?:layers\.)?(\d+)\.(weight|bias)$", rest)
        if kind == "linear" and re.match(r"(?:layers\.)?(weight|bias)$", rest):
            return "linears.0." + rest.split(".")[-1]
        if m:
            i, what = int(m.group(1)), m.group(2)
            if kind == "mlp_downsample":  # Sequential(DownSample, LayerNorm, Linear, GELU, Linear)
                return {1: f"norm.{what}", 2: f"linears.0.{what}", 4: f"linears.1.{what}"}.get(i)
            return f"linears.{i // 2}.{what}" if i % 2 == 0 else None
        m = re.match(r"linear_(\d+)\.(weight|bias)$", rest)
        if m:
            return f"linears.{int(m.group(1)) - 1}.{m.group(2)}"
        return None
    return rename


