"""`edge-vlm info MODEL`: what a model is and what it needs, read without loading its weights."""

from __future__ import annotations

from ..backends.llamacpp.choice import MODES as LLM_BACKENDS
from ..backends.llamacpp.choice import resolve_llm_backend
from ..backends.onnx.choice import MODES as VISION_BACKENDS
from ..errors import EdgeVLMError
from ..loading import default_device, default_dtype, load_model
from ..models.kv_cache import KV_CACHE_KINDS
from .memory_plan import llamacpp_plan, parameter_count, torch_plan
from .options import backend_line


def register(sub) -> None:
    p = sub.add_parser("info", help="architecture, parameters, quantization and memory of a model",
                       description="Describe a model folder without loading its weights.")
    p.add_argument("model", help="model folder or Hugging Face repo id")
    p.add_argument("--device", help="the device `chat --device` would run on: cuda or cpu (default: cuda when "
                                    "available); the memory line is for it")
    p.add_argument("--max-context", type=int, default=4096, help="context to size the KV cache for (default 4096)")
    p.add_argument("--vision-int8", action="store_true",
                   help="hold the vision tower's Linear weights in int8, one scale per output row, quantized as "
                        "they load (InternViT-6B: 11.8 -> 5.9 GB; features within 0.1%% of fp32 on the test tower)")
    p.add_argument("--kv-cache", choices=KV_CACHE_KINDS, default="model",
                   help="size the KV cache in the model's dtype (default) or int8 (`chat --kv-cache int8`)")
    p.add_argument("--backend", choices=LLM_BACKENDS, default="auto",
                   help="the language model backend `chat --backend` would use (default auto)")
    p.add_argument("--vision-backend", choices=VISION_BACKENDS, default="torch",
                   help="the vision backend `chat --vision-backend` would use (default torch)")
    p.set_defaults(func=run_info)



def memory_plan(model, args, device: str):
    """The parts the backend `chat --backend` picks on `device` will hold (auto: torch where llama.cpp
    cannot take the model, as chat falls back)."""
    backend = resolve_llm_backend(args.backend, device)
    how = (args.max_context, args.kv_cache, args.vision_int8)
    if backend == "llama.cpp":
        try:
            return llamacpp_plan(model, device, *how)
        except EdgeVLMError:
            if args.backend != "auto":
                raise
    return torch_plan(model, device, *how)


def run_info(args) -> int:
    device = str(args.device or default_device())
    # shapes only (meta), in the dtype the device computes in: what the memory line is about
    model = load_model(args.model, device="meta", dtype=default_dtype(device), max_context=args.max_context,
                       progress=False, kv_cache=args.kv_cache, vision_int8=args.vision_int8)
    i, cfg = model.info, model.llm.cfg
    plan = memory_plan(model, args, device)
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    lines = [
        f"model:         {i.path}",
        f"layout:        {i.layout}",
        f"language:      {cfg.arch}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_heads}"
        f"/{cfg.num_kv_heads} kv, vocab {cfg.vocab_size}, {parameter_count(model.llm) / 1e6:.1f}M params",
    ]
    if model.vision is not None:
        v = model.vision.cfg
        lines.append(f"vision:        {v.arch}, {v.image_size}px, patch {v.patch_size}, {len(model.vision.layers)} "
                     f"layers used, {parameter_count(model.vision) / 1e6:.1f}M params")
        lines.append(f"projector:     {i.projector}, {model.tokens_per_image} tokens per image, "
                     f"{parameter_count(model.projector) / 1e6:.1f}M params")
        lines.append(f"images:        {i.image_preparation}")
        if i.s2:
            lines.append(f"S2/tiling:     {i.s2}")
    lines += [
        f"quantization:  {i.quantization}",
        f"LLM backend:   {backend_line(args.backend, device)}",
        *([f"vision backend: {args.vision_backend}"] if model.vision is not None else []),
        f"chat template: {model.template.name}",
        f"on disk:       {gib(i.weight_bytes)}",
        f"memory ({plan.backend} on {device}): {plan.line()}",
    ]
    print("\n".join(lines))
    return 0
