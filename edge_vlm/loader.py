"""`load_model`: any supported checkpoint folder (or Hub repo id) -> a ready VisionLanguageModel.

Layouts:
- VILA: `config.json` (model_type llava_llama) with `llm/`, `vision_tower/`, `mm_projector/`
  sub-folders, each a Hugging Face folder of its own;
- LLaVA single folder, as transformers' LlavaForConditionalGeneration saves it (text_config +
  vision_config; keys under `model.language_model.` or the older `language_model.model.`);
- a plain Llama / Qwen2 / Nemotron LLM folder (text-only chat).
Weights are read straight into modules built on the meta device, so loading needs one
copy of the weights in memory, not two.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from .awq_format import open_llm_store
from .chat_template import ChatTemplate, default_template_name
from .checkpoint import TensorStore, load_into, read_json, resolve_model_path
from .config import SUPPORTED_LLMS, ImageConfig, LLMConfig, ProjectorConfig, QuantConfig, VisionConfig
from .errors import CheckpointError, EdgeVLMError, UnsupportedModelError
from .llm import DecoderLM
from .projector import Projector
from .tokenizer import Tokenizer
from .vision import VisionTower
from .vlm import ModelInfo, VisionLanguageModel

SUPPORTED_LAYOUTS = "VILA (llava_llama), LLaVA (llava), or a Llama / Qwen2 / Nemotron LLM folder"


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

    kind: str          # "vila", "llava" or "llm"
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


def _llava_layout(folder: Path, top: dict) -> CheckpointLayout:
    """transformers >= 4.52 writes `model.language_model.*`, older versions `language_model.model.*`."""
    llm = _llm_config(top["text_config"])
    if any(k.startswith("model.language_model.") for k in TensorStore(folder).keys()):
        prefixes = dict(llm_prefix="model.language_model.", vision_prefix="model.vision_tower.",
                        projector_prefix="model.multi_modal_projector.")
    else:
        prefixes = dict(llm_prefix="language_model.model.", head_prefix="language_model.",
                        vision_prefix="vision_tower.", projector_prefix="multi_modal_projector.")
    return CheckpointLayout("llava", folder, top, folder, top["text_config"], folder / "config.json", llm,
                            vision_dir=folder, projector_dir=folder, **prefixes)


# ------------------------------------------------------------------ vision tower and projector

class VisionConfigs(NamedTuple):
    """Read apart from the weights, so that load_model refuses a bad config before loading anything."""

    vision: VisionConfig
    projector: ProjectorConfig
    image: ImageConfig


class VisionParts(NamedTuple):
    tower: VisionTower
    projector: Projector
    image: ImageConfig
    weight_bytes: int  # of their own weight files (0 when they share the LLM's)


def _preprocessor_config(folder: Path) -> dict:
    path = folder / "preprocessor_config.json"
    return read_json(path) if path.is_file() else {}


def vision_configs(layout: CheckpointLayout) -> VisionConfigs:
    """The vision tower, projector and image configs of a VILA or LLaVA layout (read, not yet built)."""
    if layout.kind == "vila":
        vision = VisionConfig.from_vila(layout.config, read_json(layout.vision_dir / "config.json"))
        projector = ProjectorConfig.from_vila(layout.config, read_json(layout.projector_dir / "config.json"),
                                              vision.hidden_size, layout.llm.hidden_size)
    else:
        vision = VisionConfig.from_llava(layout.config)
        projector = ProjectorConfig.from_llava(layout.config, vision.hidden_size, layout.llm.hidden_size)
    image = ImageConfig.from_hf(_preprocessor_config(layout.vision_dir), vision.image_size, layout.config)
    return VisionConfigs(vision, projector, image)


def load_vision(layout: CheckpointLayout, configs: VisionConfigs, dtype, device, progress=False) -> VisionParts:
    """Build and fill the vision tower (up to the layer the VLM reads) and the projector."""
    vstore = TensorStore(layout.vision_dir)
    pstore = vstore if layout.projector_dir == layout.vision_dir else TensorStore(layout.projector_dir)
    tower = _build(VisionTower, configs.vision)
    load_into(tower, vstore, rename_vision(layout.vision_prefix, configs.vision.layers_used), dtype, device,
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
        from .quant_linear import prepare_quantized  # int4 layers in place of nn.Linear

        prepare_quantized(llm, qcfg)
    load_into(llm, store, rename, dtype, device, progress,
              optional=("lm_head.weight",) if cfg.tie_word_embeddings else ())
    if cfg.tie_word_embeddings:
        llm.tie_weights()
    return llm.eval()


def load_model(name_or_path, device: str | None = None, dtype: torch.dtype | None = None,
               max_context: int | None = None, template: str | None = None,
               progress=None, fast_path: bool = True, kv_cache: str | None = None,
               llm_backend: str = "torch", vision_backend: str = "torch") -> VisionLanguageModel:
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
        parts = load_vision(layout, configs, dtype, device, show)
        info.vision_arch, info.projector = configs.vision.arch, configs.projector.kind
        info.params.update(vision=_count(parts.tower), projector=_count(parts.projector))
        info.weight_bytes += parts.weight_bytes
    tok = Tokenizer(layout.llm_dir)
    model = VisionLanguageModel(llm, tok, _template_for(tok, layout.llm.arch), info, *parts[:3])
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

        optimize_for_device(model)
    if vision_backend != "torch" and model.is_multimodal:
        from .backends.onnx import attach_onnx_vision

        model.info.vision_backend = attach_onnx_vision(model, vision_backend, progress=show)
    return model


def _template_for(tok: Tokenizer, arch: str) -> ChatTemplate:
    if tok.chat_template:
        return ChatTemplate(tok.chat_template, "checkpoint", tok.bos_token, tok.eos_token)
    return ChatTemplate.builtin(default_template_name(arch, tok), tok.bos_token, tok.eos_token)


def _count(module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values()) if module else 0


def _quant_name(q: dict | None) -> str:
    qcfg = QuantConfig.from_hf(q)
    return qcfg.describe() if qcfg else "none"
