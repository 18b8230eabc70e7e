"""On-disk layouts of AWQ 4-bit weights, and conversion between them.

Two layouts exist in the wild:

- AutoAWQ "GEMM" (what transformers and vLLM read, and what `edge-vlm quantize` writes):
  `qweight` int32 [K, N/8]: eight 4-bit values of one input row k, output columns 8j..8j+7,
  stored in nibble order 0,2,4,6,1,3,5,7 (column 8j+0 in bits 0-3, 8j+2 in bits 4-7, ...);
  `qzeros` int32 [K/G, N/8] packed the same way; `scales` fp16 [K/G, N].
  w[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n].
- NVIDIA TinyChat "v2" (llm-awq, used by the published VILA AWQ checkpoints, a `.pt` file):
  `qweight` int16 [N/4, K] with rows interleaved in fours and columns permuted for the CUDA
  kernel; `scales` and `scaled_zeros` fp16 [Kp, N] where Kp is K/G rounded up to a multiple of
  8 (zero rows of padding) and scaled_zeros = -z * s, so w = q * s + scaled_zero.

The runtime keeps one in-memory layout (GEMM); `TinyChatStore` converts a TinyChat file on
the fly while it is read, so the loader and the kernels see only the GEMM layout.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .checkpoint import load_torch_file
from .config import QuantConfig
from .errors import CheckpointError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of each AutoAWQ int32 holds column 8j + AWQ_ORDER[i]
NATURAL_ORDER = tuple(range(8))       # nibble i holds column 8j + i


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 holding an unsigned 32-bit pattern -> int32 with the same bits (two's complement)."""
    x = x & 0xFFFFFFFF
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _nibble_shifts(order: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Bit offset of column c's nibble inside its int32, for c = 0..7."""
    return 4 * torch.tensor([order.index(c) for c in range(8)], dtype=dtype, device=device)


def pack_nibbles(values: torch.Tensor, order: tuple[int, ...] = NATURAL_ORDER) -> torch.Tensor:
    """[R, C] ints in 0..15 -> int32 [R, C/8], nibble i of word j holding column 8j + order[i]."""
    r, c = values.shape
    if c % 8:
        raise ValueError(f"cannot pack {c} columns: not a multiple of 8")
    v = values.to(torch.int64).reshape(r, c // 8, 8)
    return _to_int32((v << _nibble_shifts(order, torch.int64, values.device)).sum(-1))  # disjoint nibbles: sum = OR


def unpack_nibbles(packed: torch.Tensor, order: tuple[int, ...] = NATURAL_ORDER) -> torch.Tensor:
    """Inverse of `pack_nibbles`: int32 [R, C/8] -> int32 values 0..15 [R, C]."""
    v = (packed[:, :, None] >> _nibble_shifts(order, torch.int32, packed.device)) & 0xF
    return v.reshape(packed.shape[0], -1)


def pack_int4_columns(values: torch.Tensor) -> torch.Tensor:
    """[R, N] ints in 0..15 -> int32 [R, N/8] in the AutoAWQ GEMM nibble order."""
    return pack_nibbles(values, AWQ_ORDER)


def unpack_int4_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] (AutoAWQ GEMM order) -> uint8 [R, N] in 0..15."""
    return unpack_nibbles(packed, AWQ_ORDER).to(torch.uint8)


def pack_gemm(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """Integer weights q [K, N], zeros [K/G, N] and scales [K/G, N] -> the GEMM tensors."""
    return {"qweight": pack_int4_columns(q), "qzeros": pack_int4_columns(zeros),
            "scales": scales.to(torch.float16).contiguous()}


def dequantize_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """GEMM tensors -> the weight as a [K, N] matrix (x @ W), in the scales' dtype."""
    q = unpack_int4_columns(qweight).to(scales.dtype)
    z = unpack_int4_columns(qzeros).to(scales.dtype)
    k = q.shape[0]
    g = torch.arange(k, device=q.device) // group_size
    return (q - z[g]) * scales[g]


# ---------------------------------------------------------------- TinyChat (llm-awq v2) layout

TINYCHAT_INTERLEAVE = 4  # output rows interleaved per int16 word
TINYCHAT_KSTRIDE = 64    # input columns per interleaved block


def tinychat_scale_rows(in_features: int, group_size: int) -> int:
    """Rows of TinyChat's scales/scaled_zeros: K/G rounded up to 8 (and to 16/32 for G=64/32)."""
    mult = {128: 1, 64: 2, 32: 4}.get(group_size, 1)
    width = -(-(in_features // group_size) // 8)
    return (-(-width // mult) * mult) * 8


def _tinychat_permutation(k: int) -> torch.Tensor:
    """perm[p] = original column stored at position p inside each row (two fixed shuffles per 32)."""
    idx = torch.arange(k).reshape(k // 32, 4, 4, 2).permute(0, 2, 1, 3)  # 32-block shuffle
    idx = idx.reshape(k // 32, 4, 4, 2).permute(0, 1, 3, 2)              # 0,2,4,6,1,3,5,7 per 8
    return idx.reshape(k)


def unpack_tinychat_qweight(qweight: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """TinyChat int16 [N/4, K] -> uint8 q [N, K] (row n = output feature n)."""
    n, k = out_features, in_features
    il, ks = TINYCHAT_INTERLEAVE, TINYCHAT_KSTRIDE
    if tuple(qweight.shape) != (n // il, k) or k % ks or n % il:
        raise CheckpointError(f"TinyChat qweight of shape {tuple(qweight.shape)} does not fit a {n}x{k} layer")
    w = qweight.to(torch.int32) & 0xFFFF
    nib = torch.stack([(w >> (4 * i)) & 0xF for i in range(il)], dim=-1)  # [N/4, K, 4]
    # [N/4, K/64, 64, 4] read back as [N/4, K/64, 4 rows, 64 cols], then rows de-interleaved
    nib = nib.reshape(n // il, k // ks, il, ks).permute(0, 2, 1, 3).reshape(n, k)
    out = torch.empty_like(nib)
    out[:, _tinychat_permutation(k)] = nib
    return out.to(torch.uint8)


def tinychat_to_gemm(qweight: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor,
                     group_size: int) -> dict[str, torch.Tensor]:
    """One TinyChat layer -> the GEMM tensors (exact: the integers are kept, not re-quantized)."""
    n, k = scales.shape[1], qweight.shape[1]  # qweight is [N/4, K]: four int4 rows per int16
    q = unpack_tinychat_qweight(qweight, n, k)  # [N, K]
    groups = k // group_size
    s = scales[:groups].float()
    z = torch.round(-scaled_zeros[:groups].float() / torch.where(s == 0, torch.ones_like(s), s)).clamp(0, 15)
    return {"qweight": pack_int4_columns(q.t()), "qzeros": pack_int4_columns(z.to(torch.int64)),
            "scales": scales[:groups].to(torch.float16).contiguous()}


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
        return {"quant_method": "awq", "bits": 4, "group_size": self.group_size, "zero_point": True,
                "version": "gemm", "source_format": "tinychat", "modules_to_not_convert": ["lm_head"]}


def find_tinychat_checkpoint(folder: Path) -> Path | None:
    """The TinyChat `.pt` file of an LLM folder that has no safetensors/bin weights, if any."""
    folder = Path(folder)
    if any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin")):
        return None
    pts = sorted(folder.glob("*.pt"))
    return pts[0] if pts else None


def open_llm_store(folder: Path, quantization: dict | None):
    """(store, quantization_config) of an LLM folder: safetensors/bin as is, a TinyChat `.pt` converted."""
    from .checkpoint import TensorStore

    pt = find_tinychat_checkpoint(folder)
    if pt is not None:
        store = TinyChatStore(pt, QuantConfig.group_size_of(quantization))
        return store, store.quantization_config()
    return TensorStore(folder), quantization
