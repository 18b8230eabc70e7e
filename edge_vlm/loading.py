"""`load_model`: any supported checkpoint folder (or Hub repo id) -> a ready VisionLanguageModel.

Reading the folder (its layout, configs, key names) is formats/' job; this module builds the
modules on the meta device, reads the weights straight into them (one copy of the weights in
memory, not two) and puts the parts together with the backend each part runs on.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from .backends import FastPath, optimize_for_device
from .backends.llamacpp.choice import MODES, resolve_llm_backend, warn_fallback
from .backends.llamacpp.gguf_cache import cached_gguf
from .backends.onnx import release_torch_tower, with_onnx_vision
from .errors import EdgeVLMError
from .formats.checkpoint import TensorStore, load_into
from .formats.configs import ImageConfig, LLMConfig, QuantConfig
from .formats.image_processor_config import ImagePreparationWarning
from .formats.int8_rows import int8_weight_recipes, use_int8_linears
from .formats.layout import CheckpointLayout, detect_layout
from .formats.recipes import (
    DerivedStore,
    internvit_recipes,
    rename_projector,
    rename_vision,
)
from .formats.tinychat import find_tinychat_checkpoint, open_llm_store
from .formats.vision_configs import VisionConfigs, vision_configs
from .models.internvit import InternViT
from .models.kv_cache import KV_CACHE_KINDS
from .models.llm import DecoderLM
from .models.projector import Projector, vila_module_names
from .models.quant_linear import prepare_quantized
from .models.vision import VisionTower
from .text.templates import BUILTIN_TEMPLATES, ChatTemplate, default_template_name
from .text.tokenizer import Tokenizer
from .run_spec import RunSpec
from .vlm import ModelInfo, VisionLanguageModel


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.float16 if str(device).startswith("cuda") else torch.float32


class VisionParts(NamedTuple):
    tower: VisionTower | InternViT
    projector: Projector
    image: ImageConfig
    weight_bytes: int  # of their own weight files (0 when they share the LLM's)


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

        recipes = int8_weight_recipes(recipes, use_int8_linears(tower), dtype)
    load_into(tower, DerivedStore(vstore, recipes), lambda name: name, dtype, device,
              _progress("loading vision tower", progress))
    projector = _build(Projector, configs.projector)
    names = vila_module_names(configs.projector) if layout.kind == "vila" else None
    load_into(projector, pstore, rename_projector(layout.projector_prefix, configs.projector.kind, names), dtype, device,
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


def _build(cls, cfg):
    with torch.device("meta"):
        return cls(cfg)


# ------------------------------------------------------------------ the model

def load_llm(store: TensorStore, cfg: LLMConfig, dtype, device, rename, progress=None,
             quantization: dict | None = None) -> DecoderLM:
    llm = _build(DecoderLM, cfg)
    qcfg = QuantConfig.from_hf(quantization)
    if qcfg is not None:

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
               recheck_kernels: bool = False, llm_threads: int | None = None) -> VisionLanguageModel:
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
    `llm_threads`: the CPU threads llama.cpp runs on (prompt and token alike; None: every core this
    process may use); the torch backend ignores it.
    `recheck_kernels=True` discards the kept first-run verdict for this model on this GPU (which
    fast ops passed their check in a child process: backends/first_run.py) and checks again.

    `progress`: None shows bars when stderr is a terminal, True/False forces them on/off, and a
    function `(stage, done, total)` receives the progress instead (for GUIs).
    """
    if kv_cache not in (None, *KV_CACHE_KINDS):
        raise EdgeVLMError(f"kv_cache must be 'model' (the model's dtype) or 'int8', not {kv_cache!r}")
    if llm_backend not in MODES:
        raise EdgeVLMError(f"llm_backend must be one of {', '.join(MODES)}, not {llm_backend!r}")
    if llm_threads is not None and llm_threads < 1:
        raise EdgeVLMError(f"llm_threads must be at least 1, not {llm_threads}")
    show = sys.stderr.isatty() if progress is None else progress
    layout = detect_layout(name_or_path)
    device = torch.device(device or default_device())
    dtype = dtype or default_dtype(str(device))
    configs = vision_configs(layout) if layout.multimodal else None  # every config checked before weights load
    if configs is not None and configs.preparation.assumed:
        warnings.warn(configs.preparation.assumed, ImagePreparationWarning, stacklevel=2)
    store, q = open_llm_store(layout.llm_dir, layout.quantization)

    gguf = _gguf_for(layout, q is not None, llm_backend, device, show)
    if gguf is not None:
        llm = _build(DecoderLM, layout.llm).to(dtype)  # its shape only: llama.cpp holds the weights
    else:
        llm = load_llm(store, layout.llm, dtype, device, layout.llm_key, _progress("loading LLM", show), q)
    parts = load_vision(layout, configs, dtype, device, show, int8=vision_int8) if configs is not None else None
    spec = _run_spec(layout, configs, device, dtype, max_context, gguf, llm_threads, kv_cache == "int8", max_tiles)
    info = _model_info(layout, q, store, llm, parts, configs, spec, vision_int8)  # sizes as stored, before swaps
    fast = FastPath({})
    if fast_path and device.type != "meta":
        fast = optimize_for_device(llm if gguf is None else None, *(parts[:2] if parts else ()),
                                   recheck=recheck_kernels, kv_cache_int8=spec.kv_cache_int8)
    tok = Tokenizer(layout.llm_dir)
    template = _template_for(tok, layout, template)
    model = VisionLanguageModel(llm, tok, template, info, *(parts[:3] if parts else ()), spec=spec,
                                image_encoder=configs.image_encoder if configs is not None else None,
                                video_encoder=configs.video_encoder if configs is not None else None,
                                kernel_report=fast.report)
    if vision_backend != "torch" and model.is_multimodal:
        model = with_onnx_vision(model, vision_backend, progress=show)
        release_torch_tower(model)  # ONNX Runtime holds the vision weights now (no-op on the torch path)
    return model


def _gguf_for(layout: CheckpointLayout, quantized: bool, asked: str, device: torch.device, show) -> Path | None:
    """The GGUF llama.cpp runs the LLM from, when that is the backend (exported once into the cache);
    None on torch. "auto" falls back to torch with one warning where the export or llama.cpp fails."""
    if resolve_llm_backend(asked, str(device)) != "llama.cpp" or device.type == "meta":
        return None
    try:
        return cached_gguf(layout, quantized, lambda: load_for_export(layout.folder, show), show)
    except EdgeVLMError as e:
        if asked != "auto":
            raise
        warn_fallback(str(e).splitlines()[0])
        return None


def _run_spec(layout: CheckpointLayout, configs: VisionConfigs | None, device, dtype, max_context, gguf,
              llm_threads, kv_cache_int8: bool, max_tiles: int | None) -> RunSpec:
    """How the model runs: load_model's options and what the checkpoint says (context limit, tiling, S2)."""
    limit = layout.llm.max_position_embeddings
    tiling = image_format = s2 = None
    if configs is not None:
        tiling = configs.preparation.tiling
        if tiling is not None:
            tiling = tiling.with_max_tiles(max_tiles) if max_tiles is not None else tiling
            image_format = configs.image_format
        s2 = configs.s2
        if s2 is not None and max_tiles is not None:
            s2 = s2.with_max_tiles(max_tiles)
    return RunSpec(device=device, dtype=dtype, max_context=min(max_context or min(limit, 4096), limit),
                   gguf_path=gguf, llm_threads=llm_threads, kv_cache_int8=kv_cache_int8, tiling=tiling,
                   image_format=image_format, s2=s2)


def _model_info(layout: CheckpointLayout, q: dict | None, store: TensorStore, llm: DecoderLM, parts: VisionParts | None,
                configs: VisionConfigs | None, spec: RunSpec, vision_int8: bool) -> ModelInfo:
    """What `edge-vlm info` prints: the parts, their sizes, and how they run."""
    info = ModelInfo(str(layout.folder), layout.kind, layout.llm.arch, quantization=_quant_name(q),
                     params={"llm": _count(llm)}, weight_bytes=store.nbytes(), llm_backend=spec.llm_backend,
                     dtype=str(spec.dtype).replace("torch.", ""), device=str(spec.device))
    if parts is None:
        return info
    prep = configs.preparation
    if spec.tiling is not None:
        prep = dataclasses.replace(prep, tiling=spec.tiling)
    if spec.s2 is not None:
        max_tiles = spec.s2.max_tiles if spec.s2.dynamic else None
    else:
        max_tiles = spec.tiling.max_tiles if spec.tiling is not None else None
    return dataclasses.replace(
        info, vision_arch=configs.vision.arch, projector=configs.projector.kind,
        vision_quantization="int8" if vision_int8 else "none",
        params={**info.params, "vision": _count(parts.tower), "projector": _count(parts.projector)},
        weight_bytes=info.weight_bytes + parts.weight_bytes, image_preparation=prep.describe(),
        max_tiles=max_tiles, s2=spec.s2.describe() if spec.s2 is not None else None)


def _internvl_template(top: dict) -> str:
    """The conversation an InternVL / NVLM-D config names (`template`), as our built-in of that name:
    NVLM-D says chatml, InternVL 2.5/3 internvl2_5 (the -hf repos name none: internvl2_5)."""

    name = top.get("template") or ("chatml" if top["model_type"] == "NVLM_D" else "internvl2_5")
    return name if name in BUILTIN_TEMPLATES else "internvl2_5"


def _template_for(tok: Tokenizer, layout: CheckpointLayout, asked: str | None) -> ChatTemplate:
    """The template asked by name, else the checkpoint's own, else our built-in for its family."""
    if asked:
        return ChatTemplate.builtin(asked, tok.bos_token, tok.eos_token)
    if tok.chat_template:
        return ChatTemplate(tok.chat_template, "checkpoint", tok.bos_token, tok.eos_token)
    default = _internvl_template(layout.config) if layout.kind == "internvl" else None
    return ChatTemplate.builtin(default or default_template_name(layout.llm.arch, tok), tok.bos_token, tok.eos_token)


def _count(module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values()) if module else 0


def _quant_name(q: dict | None) -> str:
    qcfg = QuantConfig.from_hf(q)
    return qcfg.describe() if qcfg else "none"


def load_for_export(name_or_path, progress=None) -> VisionLanguageModel:
    """The model on the CPU in the dtype its checkpoint stores (16-bit stays 16-bit, AWQ stays int4), for
    writing it in another format: conversion is lossless and memory stays at one copy of the weights."""
    layout = detect_layout(name_or_path)
    dtype = torch.float16
    if layout.quantization is None and find_tinychat_checkpoint(layout.llm_dir) is None:
        store = TensorStore(layout.llm_dir)
        key = next((k for k in store.keys() if k.endswith("embed_tokens.weight")), None)
        stored = store.meta(key).dtype if key else torch.float32
        dtype = stored if stored in (torch.float16, torch.bfloat16) else torch.float32
    return load_model(layout.folder, device="cpu", dtype=dtype, fast_path=False, progress=progress)
