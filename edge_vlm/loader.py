"""`load_model`: any supported checkpoint folder (or Hub repo id) -> a ready VisionLanguageModel.

Layouts:
- VILA: `config.json` (model_type llava_llama) with `llm/`, `vision_tower/`, `mm_projector/`
  sub-folders, each a Hugging Face folder of its own;
- LLaVA single folder, as transformers' LlavaForConditionalGeneration saves it (text_config +
  vision_config; keys under `model.language_model.` or the older `language_model.model.`);
- InternVL / NVLM-D (InternViT tower, pixel shuffle + `mlp1`, dynamic tiling) in three layouts:
  NVLM-D's repo (`NVLM_D`) and InternVL's original one (`internvl_chat`), both `vision_model.*`,
  `mlp1.*`, `language_model.*` with `llm_config` + `vision_config`, and transformers' native
  `-hf` one (`internvl`: `model.vision_tower.*`, `model.multi_modal_projector.*`, ...);
- a plain Llama / Qwen2 / Nemotron LLM folder (text-only chat).
Weights are read straight into modules built on the meta device, so loading needs one
copy of the weights in memory, not two.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from .formats.tinychat import open_llm_store
from .chat_template import ChatTemplate, default_template_name
from .formats.checkpoint import TensorStore, load_into, read_json, resolve_model_path
from .formats.configs import SUPPORTED_LLMS, ImageConfig, LLMConfig, ProjectorConfig, QuantConfig, VisionConfig
from .errors import CheckpointError, EdgeVLMError, UnsupportedModelError
from .formats.image_processor_config import (ImagePreparation, ImagePreparationWarning, internvl_original_preparation,
                                     transformers_preparation, vila_preparation)
from .models.internvit import InternViT
from .models.llm import DecoderLM
from .models.projector import Projector
from .imaging.tiling import TilingConfig
from .tokenizer import Tokenizer
from .models.vision import VisionTower
from .vlm import ModelInfo, VisionLanguageModel

SUPPORTED_LAYOUTS = ("VILA (llava_llama), LLaVA (llava), InternVL (internvl_chat, internvl) and NVLM-D (NVLM_D), "
                     "or a Llama / Qwen2 / Nemotron LLM folder")
INTERNVL_KINDS = ("internvl_chat", "NVLM_D", "internvl")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.float16 if str(device).startswith("cuda") else torch.float32


# ------------------------------------------------------------------ checkpoint layouts

@dataclass(frozen=True)
class CheckpointLayout:
    """Where the parts of a checkpoint folder live: the one reading of a folder's layout, shared by
    `load_model` and `edge-vlm quantize`.

    LLM keys are `{llm_prefix}embed_tokens.*`, `{llm_prefix}layers.N.*`, `{llm_prefix}norm.*` and
    `{head_prefix}lm_head.*`; the vision tower's keys start with `vision_prefix` in `vision_dir`,
    the projector's with `projector_prefix` in `projector_dir` (None for a text-only LLM).
    """

    kind: str          # "vila", "llava", "internvl" (InternVL and NVLM-D, every layout) or "llm"
    folder: Path
    config: dict       # the folder's config.json
    llm_dir: Path      # the LLM's weights and tokenizer
    llm_config: dict   # the LLM's own config (VILA: llm/config.json, LLaVA: text_config)
    config_path: Path  # the config.json that holds (or receives) the LLM's quantization_config
    llm: LLMConfig
    llm_prefix: str = "model."
    head_prefix: str = ""
    vision_dir: Path | None = None
    vision_prefix: str = ""
    projector_dir: Path | None = None
    projector_prefix: str = ""

    @property
    def multimodal(self) -> bool:
        return self.vision_dir is not None

    @property
    def layer_prefix(self) -> str:
        """The key prefix of decoder layer N, less the N: `model.layers.` in most folders."""
        return self.llm_prefix + "layers."

    @property
    def quantization(self) -> dict | None:
        """The LLM's `quantization_config` as written (None: a 16-bit checkpoint)."""
        own = self.llm_config if self.kind == "vila" else self.config  # the dict at config_path
        return QuantConfig.section_of(own) or QuantConfig.section_of(self.llm_config)

    def llm_section(self, config: dict) -> dict:
        """The LLM's part of the dict read from `config_path` (LLaVA nests it under text_config)."""
        if self.kind == "internvl":
            return config["text_config"] if "text_config" in config else config["llm_config"]
        return config["text_config"] if self.kind == "llava" else config

    def llm_key(self, key: str) -> str | None:
        """The DecoderLM parameter name of a checkpoint key; None for keys outside the LLM."""
        if key.startswith(self.llm_prefix):
            return key[len(self.llm_prefix):]
        if key.startswith(self.head_prefix + "lm_head."):
            return key[len(self.head_prefix):]
        return None


def _llm_config(d: dict) -> LLMConfig:
    try:
        return LLMConfig.from_hf(d)
    except KeyError as e:
        raise CheckpointError(f"language model config lacks {e.args[0]!r}") from None


def detect_layout(name_or_path) -> CheckpointLayout:
    """Resolve a folder (or Hub repo id) and say which supported layout it is; the LLM config is checked."""
    folder = resolve_model_path(name_or_path)
    top = read_json(folder / "config.json")
    kind = top.get("model_type")
    if kind == "llava_llama" or (folder / "llm" / "config.json").is_file():
        return _vila_layout(folder, top)
    if kind == "llava" and "text_config" in top:
        return _llava_layout(folder, top)
    if kind in INTERNVL_KINDS:
        return _internvl_layout(folder, top)
    if kind in SUPPORTED_LLMS:
        return CheckpointLayout("llm", folder, top, folder, top, folder / "config.json", _llm_config(top))
    raise UnsupportedModelError(f"unsupported model type {kind!r} in {folder}; supported: {SUPPORTED_LAYOUTS}")


def _vila_layout(folder: Path, top: dict) -> CheckpointLayout:
    for sub in ("llm", "vision_tower", "mm_projector"):
        if not (folder / sub).is_dir():
            raise CheckpointError(f"VILA checkpoint {folder} lacks the {sub}/ folder")
    llm_top = read_json(folder / "llm" / "config.json")
    return CheckpointLayout("vila", folder, top, folder / "llm", llm_top, folder / "llm" / "config.json",
                            _llm_config(llm_top), vision_dir=folder / "vision_tower",
                            projector_dir=folder / "mm_projector")


def _hf_vlm_prefixes(folder: Path) -> dict:
    """Key prefixes of a transformers VLM folder (LLaVA, InternVL -hf): transformers >= 4.52 writes
    `model.language_model.*`, older versions `language_model.model.*`."""
    if any(k.startswith("model.language_model.") for k in TensorStore(folder).keys()):
        return dict(llm_prefix="model.language_model.", vision_prefix="model.vision_tower.",
                    projector_prefix="model.multi_modal_projector.")
    return dict(llm_prefix="language_model.model.", head_prefix="language_model.",
                vision_prefix="vision_tower.", projector_prefix="multi_modal_projector.")


def _llava_layout(folder: Path, top: dict) -> CheckpointLayout:
    """transformers >= 4.52 writes `model.language_model.*`, older versions `language_model.model.*`."""
    llm = _llm_config(top["text_config"])
    prefixes = _hf_vlm_prefixes(folder)
    return CheckpointLayout("llava", folder, top, folder, top["text_config"], folder / "config.json", llm,
                            vision_dir=folder, projector_dir=folder, **prefixes)


def _internvl_llm_config(d: dict) -> dict:
    """InternVL / NVLM-D's `llm_config` as our LLMConfig reads it. NVLM-D writes its Qwen2 as
    model_type "llama" (architectures say Qwen2ForCausalLM) with a dynamic rope_scaling that the
    transformers Qwen2 it was run with never applied: it is read as the Qwen2 it is."""
    d = dict(d)
    if (d.get("architectures") or [None])[0] == "Qwen2ForCausalLM" and d.get("model_type") != "qwen2":
        d["model_type"] = "qwen2"
        d.pop("rope_scaling", None)
    return d


def _internvl_layout(folder: Path, top: dict) -> CheckpointLayout:
    hf = top["model_type"] == "internvl"
    if hf:  # as transformers writes it (and the Hub's -hf repos), or with its in-memory "model." names
        llm_top = top["text_config"]
        prefixes = _hf_vlm_prefixes(folder)
    else:
        if "llm_config" not in top or "vision_config" not in top:
            raise CheckpointError(f"{folder}/config.json lacks llm_config or vision_config")
        llm_top = _internvl_llm_config(top["llm_config"])
        prefixes = dict(llm_prefix="language_model.model.", head_prefix="language_model.",
                        vision_prefix="vision_model.", projector_prefix="mlp1.")
    llm = _llm_config(llm_top)
    if not llm.tie_word_embeddings and prefixes.get("head_prefix", "") + "lm_head.weight" not in TensorStore(folder):
        llm.tie_word_embeddings = True  # -hf folders of tied models (InternVL3-1B) store no lm_head
    return CheckpointLayout("internvl", folder, top, folder, llm_top, folder / "config.json", llm,
                            vision_dir=folder, projector_dir=folder, **prefixes)


# ------------------------------------------------------------------ vision tower and projector

class VisionConfigs(NamedTuple):
    """Read apart from the weights, so that load_model refuses a bad config before loading anything."""

    vision: VisionConfig
    projector: ProjectorConfig
    preparation: ImagePreparation  # how pictures become pixels (and tiles, for InternVL / NVLM-D)
    image_format: str | None = None  # how tiled images are written in the prompt ("internvl", "nvlm")

    @property
    def image(self) -> ImageConfig:
        return self.preparation.image

    @property
    def tiling(self) -> TilingConfig | None:
        return self.preparation.tiling


class VisionParts(NamedTuple):
    tower: VisionTower | InternViT
    projector: Projector
    image: ImageConfig
    weight_bytes: int  # of their own weight files (0 when they share the LLM's)


def vision_configs(layout: CheckpointLayout) -> VisionConfigs:
    """The vision tower, projector and image preparation of a multimodal layout (read, not yet built)."""
    if layout.kind == "internvl":
        return _internvl_configs(layout)
    if layout.kind == "vila":
        vision = VisionConfig.from_vila(layout.config, read_json(layout.vision_dir / "config.json"))
        projector = ProjectorConfig.from_vila(layout.config, read_json(layout.projector_dir / "config.json"),
                                              vision.hidden_size, layout.llm.hidden_size)
        prep = vila_preparation(layout.vision_dir, vision.arch, vision.image_size, layout.config)
    else:
        vision = VisionConfig.from_llava(layout.config)
        projector = ProjectorConfig.from_llava(layout.config, vision.hidden_size, layout.llm.hidden_size)
        prep = transformers_preparation(layout.folder, vision.arch, vision.image_size, "llava")
    return VisionConfigs(vision, projector, prep)


def _internvl_configs(layout: CheckpointLayout) -> VisionConfigs:
    top, llm = layout.config, layout.llm
    if top["model_type"] == "internvl":  # transformers' -hf: tiling from the image processor
        layer = top.get("vision_feature_layer", -1)
        if isinstance(layer, list) or top.get("vision_feature_select_strategy", "default") != "default":
            raise UnsupportedModelError("InternVL checkpoints that keep the CLS token or concatenate several "
                                        "vision layers are not supported")
        vision = VisionConfig.from_internvit(top["vision_config"], select_layer=layer)
        act = top.get("projector_hidden_act", "gelu")
        prep = transformers_preparation(layout.folder, vision.arch, vision.image_size, "internvl")
        if prep.image.size != vision.image_size:
            raise UnsupportedModelError(f"the image processor's {prep.image.size} px tiles do not match the "
                                        f"InternViT tower's {vision.image_size} px")
        mid, bias, fmt = llm.hidden_size, True, "internvl"
    else:
        if top.get("ps_version", "v2") != "v2":
            raise UnsupportedModelError(f"InternVL pixel shuffle {top.get('ps_version')!r} is not supported; "
                                        "supported: v2 (InternVL 1.5 and later)")
        vision = VisionConfig.from_internvit(top["vision_config"], select_layer=top.get("select_layer", -1))
        vision.image_size = top.get("force_image_size") or vision.image_size
        act = "gelu"
        prep = internvl_original_preparation(top, vision.image_size)
        nvlm = top["model_type"] == "NVLM_D"  # its mlp1: no biases, the LLM's intermediate size in the middle
        mid, bias, fmt = (llm.intermediate_size, False, "nvlm") if nvlm else (llm.hidden_size, True, "internvl")
    if act != "gelu":
        raise UnsupportedModelError(f"unsupported projector activation {act!r}")
    projector = ProjectorConfig("mlp1", vision.hidden_size, llm.hidden_size, mid_dim=mid, bias=bias,
                                downsample_ratio=float(top.get("downsample_ratio", 0.5)))
    return VisionConfigs(vision, projector, prep, fmt)


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


def load_vision(layout: CheckpointLayout, configs: VisionConfigs, dtype, device, progress=False,
                int8: bool = False) -> VisionParts:
    """Build and fill the vision tower (up to the layer the VLM reads) and the projector.
    `int8`: the tower's Linears as int8 weights (one scale per row), quantized as each is read."""
    vstore = TensorStore(layout.vision_dir)
    pstore = vstore if layout.projector_dir == layout.vision_dir else TensorStore(layout.projector_dir)
    if configs.vision.arch == "internvit":
        tower = _build(InternViT, configs.vision)
        recipes = internvit_recipes(vstore, layout.vision_prefix, configs.vision)
    else:
        tower = _build(VisionTower, configs.vision)
        rename = rename_vision(layout.vision_prefix, configs.vision.layers_used)
        recipes = {name: (lambda f, key=key: f(key)) for key in vstore.keys() if (name := rename(key))}
    if int8:
        from .formats.int8_rows import int8_weight_recipes, use_int8_linears

        recipes = int8_weight_recipes(recipes, use_int8_linears(tower), dtype)
    load_into(tower, DerivedStore(vstore, recipes), lambda name: name, dtype, device,
              _progress("loading vision tower", progress))
    projector = _build(Projector, configs.projector)
    load_into(projector, pstore, rename_projector(layout.projector_prefix, configs.projector.kind), dtype, device,
              _progress("loading projector", progress))
    own = 0 if layout.vision_dir == layout.llm_dir else vstore.nbytes() + pstore.nbytes()
    return VisionParts(tower.eval(), projector.eval(), configs.image, own)


def _progress(desc: str, report):
    """Wrap the tensor names being loaded: a tqdm bar when `report` is True, calls of
    `report(stage, done, total)` when it is a function (the desktop app's progress bar)."""
    if not report:
        return None
    if callable(report):
        def each(keys):
            for i, key in enumerate(keys):
                report(desc, i, len(keys))
                yield key
            report(desc, len(keys), len(keys))
        return each
    return lambda keys: tqdm(keys, desc=desc, unit="tensor", leave=False, file=sys.stderr)


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


def _build(cls, cfg):
    with torch.device("meta"):
        return cls(cfg)


# ------------------------------------------------------------------ the model

def load_llm(store: TensorStore, cfg: LLMConfig, dtype, device, rename, progress=None,
             quantization: dict | None = None) -> DecoderLM:
    llm = _build(DecoderLM, cfg)
    qcfg = QuantConfig.from_hf(quantization)
    if qcfg is not None:
        from .models.quant_linear import prepare_quantized  # int4 layers in place of nn.Linear

        prepare_quantized(llm, qcfg)
    load_into(llm, store, rename, dtype, device, progress,
              optional=("lm_head.weight",) if cfg.tie_word_embeddings else ())
    if cfg.tie_word_embeddings:
        llm.tie_weights()
    return llm.eval()


def load_model(name_or_path, device: str | None = None, dtype: torch.dtype | None = None,
               max_context: int | None = None, template: str | None = None,
               progress=None, fast_path: bool = True, kv_cache: str | None = None,
               llm_backend: str = "torch", vision_backend: str = "torch",
               max_tiles: int | None = None, vision_int8: bool = False,
               recheck_kernels: bool = False) -> VisionLanguageModel:
    """Load a checkpoint. `device` defaults to CUDA when present; `dtype` to fp16 there, fp32 on CPU.

    `fast_path=False` keeps the plain torch modules (the reference the fast paths are tested
    against) instead of swapping in the device's kernels. `kv_cache="int8"` makes the KV caches
    the model's engines build int8 (half the memory of fp16; see kv_cache.py).
    `llm_backend="llama.cpp"` runs the language model in llama.cpp from a GGUF export made once
    into edge-vlm's cache folder (backends/llamacpp/gguf_cache.py); the vision tower, projector,
    tokenizer, template and sampler stay ours. "auto" (the CLI's default) picks llama.cpp on the
    CPU when llama-cpp-python is installed (backends/llamacpp/choice.py). `vision_backend="onnx"` runs the vision tower and
    projector in ONNX Runtime (TensorRT, CUDA or CPU int8; exported once into the cache folder),
    "auto" only where it is timed faster than torch; either falls back to torch with one warning.
    `max_tiles` caps the tiles an image is cut into for tiled models (InternVL, NVLM-D; 1 = one
    448 px tile per image, the fastest); None keeps the checkpoint's own maximum. `vision_int8=True`
    holds the vision tower's Linear weights in int8 with one scale per output row (int8_rows.py), half
    of fp16: for InternViT-6B (NVLM-D) 11.8 GB -> 5.9 GB; the projector stays in `dtype`.
    `recheck_kernels=True` discards the kept first-run verdict for this model on this GPU (which
    fast ops passed their check in a child process: backends/first_run.py) and checks again.

    `progress`: None shows bars when stderr is a terminal, True/False forces them on/off, and a
    function `(stage, done, total)` receives the progress instead (for GUIs).
    """
    if kv_cache not in (None, "model", "int8"):
        raise EdgeVLMError(f"kv_cache must be 'model' (the model's dtype) or 'int8', not {kv_cache!r}")
    from .backends.llamacpp.choice import MODES, resolve_llm_backend, warn_fallback

    if llm_backend not in MODES:
        raise EdgeVLMError(f"llm_backend must be one of {', '.join(MODES)}, not {llm_backend!r}")
    layout = detect_layout(name_or_path)
    device = device or default_device()
    auto, llm_backend = llm_backend == "auto", resolve_llm_backend(llm_backend, device)
    dtype = dtype or default_dtype(device)
    show = sys.stderr.isatty() if progress is None else progress
    configs = vision_configs(layout) if layout.multimodal else None  # every config checked before weights load
    if configs is not None and configs.preparation.assumed:
        warnings.warn(configs.preparation.assumed, ImagePreparationWarning, stacklevel=2)
    store, q = open_llm_store(layout.llm_dir, layout.quantization)
    gguf = None
    if llm_backend == "llama.cpp" and str(device) != "meta":
        from .backends.llamacpp.gguf_cache import cached_gguf  # exported once, on first use

        try:
            gguf = cached_gguf(layout, q is not None, show)
        except EdgeVLMError as e:
            if not auto:
                raise
            warn_fallback(str(e).splitlines()[0])
            llm_backend = "torch"
    if gguf is not None:
        llm = _build(DecoderLM, layout.llm).to(dtype)  # its shape only: llama.cpp holds the weights
    else:
        llm = load_llm(store, layout.llm, dtype, device, layout.llm_key, _progress("loading LLM", show), q)
    info = ModelInfo(str(layout.folder), layout.kind, layout.llm.arch, quantization=_quant_name(q),
                     params={"llm": _count(llm)}, weight_bytes=store.nbytes(), llm_backend=llm_backend)
    parts = ()
    if configs is not None:
        parts = load_vision(layout, configs, dtype, device, show, int8=vision_int8)
        info.vision_arch, info.projector = configs.vision.arch, configs.projector.kind
        info.vision_quantization = "int8" if vision_int8 else "none"
        info.params.update(vision=_count(parts.tower), projector=_count(parts.projector))
        info.weight_bytes += parts.weight_bytes
    tok = Tokenizer(layout.llm_dir)
    default = _internvl_template(layout.config) if layout.kind == "internvl" else None
    model = VisionLanguageModel(llm, tok, _template_for(tok, layout.llm.arch, default), info, *parts[:3])
    if configs is not None:
        prep = configs.preparation
        if prep.tiling is not None:
            if max_tiles is not None:
                prep = dataclasses.replace(prep, tiling=prep.tiling.with_max_tiles(max_tiles))
            model.tiling, model.image_format = prep.tiling, configs.image_format
            model.info.max_tiles = prep.tiling.max_tiles
        model.info.image_preparation = prep.describe()
    limit = model.llm.cfg.max_position_embeddings
    model.max_context = min(max_context or min(limit, 4096), limit)
    if template:
        model.template = ChatTemplate.builtin(template, tok.bos_token, tok.eos_token)
    model.llm.kv_cache_int8 = kv_cache == "int8"
    model.info.dtype = str(dtype).replace("torch.", "")
    model.info.device = str(device)
    if gguf is not None:
        model.gguf_path, model.torch_device = gguf, torch.device(device)
    if fast_path and str(device) != "meta":
        from .backends import optimize_for_device  # the device's fast path (Triton on CUDA, int4 on CPU)

        optimize_for_device(model, recheck=recheck_kernels)
    if vision_backend != "torch" and model.is_multimodal:
        from .backends.onnx import attach_onnx_vision, release_torch_tower

        model.info.vision_backend = attach_onnx_vision(model, vision_backend, progress=show)
        release_torch_tower(model)  # ONNX Runtime holds the vision weights now (no-op on the torch path)
    return model


def _internvl_template(top: dict) -> str:
    """The conversation an InternVL / NVLM-D config names (`template`), as our built-in of that name:
    NVLM-D says chatml, InternVL 2.5/3 internvl2_5 (the -hf repos name none: internvl2_5)."""
    from .chat_template import BUILTIN_TEMPLATES

    name = top.get("template") or ("chatml" if top["model_type"] == "NVLM_D" else "internvl2_5")
    return name if name in BUILTIN_TEMPLATES else "internvl2_5"


def _template_for(tok: Tokenizer, arch: str, default: str | None = None) -> ChatTemplate:
    if tok.chat_template:
        return ChatTemplate(tok.chat_template, "checkpoint", tok.bos_token, tok.eos_token)
    return ChatTemplate.builtin(default or default_template_name(arch, tok), tok.bos_token, tok.eos_token)


def _count(module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values()) if module else 0


def _quant_name(q: dict | None) -> str:
    qcfg = QuantConfig.from_hf(q)
    return qcfg.describe() if qcfg else "none"
