"""AWQ checkpoint files: NVIDIA TinyChat `.pt` files read as GEMM-layout tensor stores.

Kept apart from the tensor formats (int4_formats.py) because this is file handling: finding the
`.pt` of an LLM folder, unwrapping how it was saved, inferring the group size from shapes and
answering the loader's TensorStore questions (keys, meta, get). The runtime keeps one in-memory
layout (GEMM); `TinyChatStore` converts each TinyChat layer on the fly while it is read, so the
loader and the backends see only the GEMM layout.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .checkpoint import TensorStore, load_torch_file
from .configs import QuantConfig
from ..errors import CheckpointError
from .int4_formats import tinychat_scale_rows, tinychat_to_gemm


class TinyChatStore:
    """A TensorStore look-alike over a TinyChat `.pt` checkpoint that yields GEMM-layout tensors.

    Keys `X.qweight / X.scales / X.scaled_zeros` become `X.qweight / X.qzeros / X.scales`;
    everything else (embeddings, norms, lm_head) passes through.
    """

    def __init__(self, path: Path, group_size: int | None = None):
        self.path = Path(path)
        self.folder = self.path.parent
        state = load_torch_file(self.path)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if state and all(k.startswith("llm.") for k in state):  # saved from the whole VILA model
            state = {k[len("llm."):]: v for k, v in state.items()}
        self._raw: dict[str, torch.Tensor] = state
        self.layers = sorted(k[: -len(".scaled_zeros")] for k in state if k.endswith(".scaled_zeros"))
        self._layer_set = set(self.layers)
        if not self.layers:
            raise CheckpointError(f"{self.path} has no TinyChat AWQ layers (no *.scaled_zeros tensors)")
        self.group_size = group_size or self._infer_group_size()
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def _infer_group_size(self) -> int:
        m = re.search(r"g(\d+)", self.path.name)
        first = self.layers[0]
        k = self._raw[first + ".qweight"].shape[1]
        rows = self._raw[first + ".scales"].shape[0]
        candidates = ([int(m.group(1))] if m else []) + [128, 64, 32]
        for g in candidates:
            if k % g == 0 and tinychat_scale_rows(k, g) == rows:
                return g
        raise CheckpointError(f"cannot tell the group size of {self.path} (scales have {rows} rows for K={k})")

    def _converted(self, layer: str) -> dict[str, torch.Tensor]:
        if layer not in self._cache:
            self._cache = {layer: tinychat_to_gemm(self._raw[layer + ".qweight"], self._raw[layer + ".scales"],
                                                   self._raw[layer + ".scaled_zeros"], self.group_size)}
        return self._cache[layer]

    def _split(self, key: str):
        layer, _, what = key.rpartition(".")
        if layer in self._layer_set and what in ("qweight", "qzeros", "scales"):
            return layer, what
        return None, None

    def keys(self) -> list[str]:
        out = []
        for key in self._raw:
            layer, what = key.rpartition(".")[0], key.rpartition(".")[2]
            if layer in self._layer_set and what in ("scales", "scaled_zeros", "qweight"):
                if what == "qweight":
                    out += [f"{layer}.qweight", f"{layer}.qzeros", f"{layer}.scales"]
                continue
            out.append(key)
        return out

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def get(self, key: str) -> torch.Tensor:
        layer, what = self._split(key)
        if layer is not None:
            return self._converted(layer)[what]
        return self._raw[key]

    def meta(self, key: str) -> torch.Tensor:
        layer, what = self._split(key)
        if layer is None:
            return self._raw[key].to("meta")
        n = self._raw[layer + ".scales"].shape[1]
        k = self._raw[layer + ".qweight"].shape[1]
        shape = {"qweight": (k, n // 8), "qzeros": (k // self.group_size, n // 8),
                 "scales": (k // self.group_size, n)}[what]
        return torch.empty(shape, dtype=torch.float16 if what == "scales" else torch.int32, device="meta")

    def nbytes(self) -> int:
        return self.path.stat().st_size

    def quantization_config(self) -> dict:
        conf = QuantConfig(group_size=self.group_size, modules_to_not_convert=("lm_head",)).to_hf()
        return {**conf, "source_format": "tinychat"}  # converted to the GEMM layout on load


def find_tinychat_checkpoint(folder: Path) -> Path | None:
    """The TinyChat `.pt` file of an LLM folder that has no safetensors/bin weights, if any."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
        return None
    pts = sorted(folder.glob("*.pt"))
    return pts[0] if pts else None


def open_llm_store(folder: Path, quantization: dict | None):
    """(store, quantization_config) of an LLM folder: safetensors/bin as is, a TinyChat `.pt` converted."""
    pt = find_tinychat_checkpoint(folder)
    if pt is not None:
        store = TinyChatStore(pt, QuantConfig.group_size_of(quantization))
        return store, store.quantization_config()
    return TensorStore(folder), quantization
