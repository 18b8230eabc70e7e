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
from pathlib import Path

import torch
from tqdm import tqdm

from .awq_format import open_llm_store
from .chat_template import ChatTemplate, default_template_name
from .checkpoint import TensorStore, load_into, read_json, resolve_model_path
from .config import LLMConfig, ProjectorConfig, QuantConfig, VisionConfig
from .errors import CheckpointError, EdgeVLMError, UnsupportedModelError
from .llm import DecoderLM
from .preprocess import image_config_from_hf, read_preprocessor_config
from .projector import Projector
from .tokenizer import Tokenizer
from .vision import VisionTower
from .vlm import ModelInfo, VisionLanguageModel

SUPPORTED_LAYOUTS = "VILA (llava_llama), LLaVA (llava), or a Llama / Qwen2 / Nemotron LLM folder"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.float16 if str(device).startswith("cuda") else torch.float32


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


def _rename_llm(prefixes: tuple[str, ...]):
    def rename(key: str):
        for p in prefixes:
            if key.startswith(p):
                rest = key[len(p):]
                return rest[len("model."):] if rest.startswith("model.") else rest
        return None
    return rename


def _rename_vision(prefix: str, layers_used: int):
    def rename(key: str):
        if not key.startswith(prefix):
            return None
        rest = key[len(prefix):].replace("vision_model.", "", 1).replace("encoder.layers.", "layers.", 1)
        m = re.match(r"layers\.(\d+)\.", rest)
        if m and int(m.group(1)) >= layers_used:
            return None  # layers after the selected one are never run
        return rest
    return rename


def _rename_projector(prefix: str, kind: str):
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


def load_llm(store: TensorStore, cfg: LLMConfig, dtype, device, rename=None, progress=None,
             quantization: dict | None = None) -> DecoderLM:
    llm = _build(DecoderLM, cfg)
    qcfg = QuantConfig.from_hf(quantization)
    if qcfg is not None:
        from .quant_linear import prepare_quantized  # int4 layers in place of nn.Linear

        prepare_quantized(llm, qcfg)
    load_into(llm, store, rename or _rename_llm(("",)), dtype, device, progress,
              optional=("lm_head.weight",) if cfg.tie_word_embeddings else ())
    if cfg.tie_word_embeddings:
        llm.tie_weights()
    return llm.eval()


def _llm_config(d: dict) -> LLMConfig:
    try:
        return LLMConfig.from_hf(d)
    except KeyError as e:
        raise CheckpointError(f"language model config lacks {e.args[0]!r}") from None


def load_model(name_or_path, device: str | None = None, dtype: torch.dtype | None = None,
               max_context: int | None = None, template: str | None = None,
               progress=None, fast_path: bool = True, kv_cache: str | None = None) -> VisionLanguageModel:
    """Load a checkpoint. `device` defaults to CUDA when present; `dtype` to fp16 there, fp32 on CPU.

    `fast_path=False` keeps the plain torch modules (the reference the fast paths are tested
    against) instead of swapping in the device's kernels. `kv_cache="int8"` makes the KV caches
    the model's engines build int8 (half the memory of fp16; see kv_cache.py).

    `progress`: None shows bars when stderr is a terminal, True/False forces them on/off, and a
    function `(stage, done, total)` receives the progress instead (for GUIs).
    """
    if kv_cache not in (None, "model", "int8"):
        raise EdgeVLMError(f"kv_cache must be 'model' (the model's dtype) or 'int8', not {kv_cache!r}")
    folder = resolve_model_path(name_or_path)
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    show = sys.stderr.isatty() if progress is None else progress
    top = read_json(folder / "config.json")
    kind = top.get("model_type")
    if kind == "llava_llama" or (folder / "llm" / "config.json").is_file():
        model = _load_vila(folder, top, dtype, device, show)
    elif kind == "llava" and "text_config" in top:
        model = _load_llava(folder, top, dtype, device, show)
    elif kind in ("llama", "qwen2", "nemotron"):
        model = _load_text_only(folder, top, dtype, device, show)
    else:
        raise UnsupportedModelError(f"unsupported model type {kind!r} in {folder}; supported: {SUPPORTED_LAYOUTS}")
    limit = model.llm.cfg.max_position_embeddings
    model.max_context = min(max_context or min(limit, 4096), limit)
    tok = model.tokenizer
    if template:
        model.template = ChatTemplate.builtin(template, tok.bos_token, tok.eos_token)
    model.llm.kv_cache_int8 = kv_cache == "int8"
    model.info.dtype = str(dtype).replace("torch.", "")
    model.info.device = str(device)
    if fast_path and str(device) != "meta":
        from .kernels.dispatch import optimize_for_device  # the device's fast path (Triton on CUDA, int4 on CPU)

        optimize_for_device(model)
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


def _load_text_only(folder: Path, top: dict, dtype, device, show) -> VisionLanguageModel:
    cfg = _llm_config(top)
    store, q = open_llm_store(folder, top.get("quantization_config"))
    llm = load_llm(store, cfg, dtype, device, progress=_progress("loading LLM", show), quantization=q)
    tok = Tokenizer(folder)
    info = ModelInfo(str(folder), "llm", cfg.arch, quantization=_quant_name(q),
                     params={"llm": _count(llm)}, weight_bytes=store.nbytes())
    return VisionLanguageModel(llm, tok, _template_for(tok, cfg.arch), info)


def _load_vila(folder: Path, top: dict, dtype, device, show) -> VisionLanguageModel:
    for sub in ("llm", "vision_tower", "mm_projector"):
        if not (folder / sub).is_dir():
            raise CheckpointError(f"VILA checkpoint {folder} lacks the {sub}/ folder")
    if top.get("s2") or top.get("dynamic_s2") or top.get("image_aspect_ratio") == "dynamic_s2":
        raise UnsupportedModelError("VILA checkpoints with S2 multi-scale image tiling (NVILA, *-s2) are not "
                                    "supported yet; supported: VILA1.5 (image_aspect_ratio resize or pad)")
    llm_top = read_json(folder / "llm" / "config.json")
    cfg = _llm_config(llm_top)
    vcfg = VisionConfig.from_hf(read_json(folder / "vision_tower" / "config.json"),
                                select_layer=top.get("mm_vision_select_layer", -2),
                                select_feature=top.get("mm_vision_select_feature", "cls_patch"))
    pcfg_json = read_json(folder / "mm_projector" / "config.json")
    pcfg = ProjectorConfig(pcfg_json.get("mm_projector_type", top.get("mm_projector_type", "linear")),
                           top.get("mm_hidden_size", vcfg.hidden_size), cfg.hidden_size)
    llm_store, q = open_llm_store(folder / "llm", llm_top.get("quantization_config"))
    llm = load_llm(llm_store, cfg, dtype, device, progress=_progress("loading LLM", show), quantization=q)
    vstore, pstore = TensorStore(folder / "vision_tower"), TensorStore(folder / "mm_projector")
    vision = _build(VisionTower, vcfg)
    load_into(vision, vstore, _rename_vision("", vcfg.layers_used), dtype, device,
              _progress("loading vision tower", show))
    projector = _build(Projector, pcfg)
    load_into(projector, pstore, _rename_projector("", pcfg.kind), dtype, device,
              _progress("loading projector", show))
    image_cfg = image_config_from_hf(read_preprocessor_config(folder / "vision_tower"), vcfg.image_size,
                                     top.get("image_aspect_ratio"))
    tok = Tokenizer(folder / "llm")
    info = ModelInfo(str(folder), "vila", cfg.arch, vcfg.arch, pcfg.kind, _quant_name(q),
                     params={"llm": _count(llm), "vision": _count(vision), "projector": _count(projector)},
                     weight_bytes=llm_store.nbytes() + vstore.nbytes() + pstore.nbytes())
    return VisionLanguageModel(llm.eval(), tok, _template_for(tok, cfg.arch), info, vision.eval(),
                               projector.eval(), image_cfg)


def _load_llava(folder: Path, top: dict, dtype, device, show) -> VisionLanguageModel:
    cfg = _llm_config(top["text_config"])
    strategy = top.get("vision_feature_select_strategy", "default")
    layer = top.get("vision_feature_layer", -2)
    if isinstance(layer, list):
        raise UnsupportedModelError("LLaVA checkpoints that concatenate several vision layers are not supported")
    vcfg = VisionConfig.from_hf(top["vision_config"], select_layer=layer,
                                select_feature="default" if strategy == "default" else "full")
    act = top.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise UnsupportedModelError(f"unsupported projector activation {act!r}")
    pcfg = ProjectorConfig("mlp2x_gelu", vcfg.hidden_size, cfg.hidden_size)
    store = TensorStore(folder)
    new_layout = any(k.startswith("model.language_model.") for k in store.keys())
    q = top.get("quantization_config")

    def lm_rename(key: str):
        if key.startswith("model.language_model."):  # transformers >= 4.52
            return key[len("model.language_model."):]
        if key.startswith("lm_head."):  # lm_head.weight, or qweight/qzeros/scales when int4
            return key
        if key.startswith("language_model."):  # older: language_model.model.*, language_model.lm_head.*
            return _rename_llm(("language_model.",))(key)
        return None

    llm = load_llm(store, cfg, dtype, device, lm_rename, _progress("loading LLM", show), q)
    vprefix = "model.vision_tower." if new_layout else "vision_tower."
    pprefix = "model.multi_modal_projector." if new_layout else "multi_modal_projector."
    vision = _build(VisionTower, vcfg)
    load_into(vision, store, _rename_vision(vprefix, vcfg.layers_used), dtype, device,
              _progress("loading vision tower", show))
    projector = _build(Projector, pcfg)
    load_into(projector, store, _rename_projector(pprefix, pcfg.kind), dtype, device)
    image_cfg = image_config_from_hf(read_preprocessor_config(folder), vcfg.image_size, top.get("image_aspect_ratio"))
    tok = Tokenizer(folder)
    info = ModelInfo(str(folder), "llava", cfg.arch, vcfg.arch, pcfg.kind, _quant_name(q),
                     params={"llm": _count(llm), "vision": _count(vision), "projector": _count(projector)},
                     weight_bytes=store.nbytes())
    return VisionLanguageModel(llm.eval(), tok, _template_for(tok, cfg.arch), info, vision.eval(),
                               projector.eval(), image_cfg)
