"""The runtime's own subcommands: `chat`, `info`, `doctor` (edge_vlm/doctor.py) and `export`."""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_MODEL = "Efficient-Large-Model/VILA1.5-3b-AWQ"  # 4-bit LLM (TinyChat .pt), 16-bit vision


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model about images, video or text",
                       description="Stream an answer to QUESTION, or open an interactive chat without one. "
                                   "In the interactive chat: /image PATH attaches an image to the next question, "
                                   "/video PATH a video, /reset starts over, /quit leaves.")
    p.add_argument("question", nargs="?", help="the question; omit for an interactive chat")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model folder or Hugging Face repo id (default: {DEFAULT_MODEL})")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeat for several)")
    p.add_argument("--video", metavar="PATH", help="a video; --frames frames are sampled evenly from it")
    p.add_argument("--frames", type=int, default=8, help="frames sampled from --video (default 8)")
    p.add_argument("--system", help="system prompt (default: the model's own)")
    add_generation_options(p)
    add_model_options(p)
    p.add_argument("--quiet", action="store_true", help="do not print timing and memory after each answer")
    p.set_defaults(func=run_chat)

    p = sub.add_parser("info", help="architecture, parameters, quantization and memory of a model",
                       description="Describe a model folder without loading its weights.")
    p.add_argument("model", help="model folder or Hugging Face repo id")
    p.add_argument("--max-context", type=int, default=4096, help="context to size the KV cache for (default 4096)")
    p.add_argument("--vision-int8", action="store_true",
                   help="hold the vision tower's Linear weights in int8, one scale per output row, quantized as "
                        "they load (InternViT-6B: 11.8 -> 5.9 GB; features within 0.1%% of fp32 on the test tower)")
    p.add_argument("--kv-cache", choices=["model", "int8"], default="model",
                   help="size the KV cache in the model's dtype (default) or int8 (`chat --kv-cache int8`)")
    p.add_argument("--backend", choices=["auto", "torch", "llama.cpp"], default="auto",
                   help="the language model backend `chat --backend` would use (default auto)")
    p.add_argument("--vision-backend", choices=["torch", "onnx", "auto"], default="torch",
                   help="the vision backend `chat --vision-backend` would use (default torch)")
    p.set_defaults(func=run_info)

    from . import doctor

    doctor.register(sub)
    _register_export(sub)


def _register_export(sub) -> None:
    """`edge-vlm export gguf|onnx`: a model's parts in the formats other runtimes run."""
    from .backends.llamacpp import gguf_export
    from .backends.onnx import cli as onnx_cli

    p = sub.add_parser("export", help="write the LLM as GGUF (llama.cpp) or the vision tower as ONNX",
                       description="Export a model's language model to GGUF for llama.cpp, or its vision tower and "
                                   "projector to ONNX for ONNX Runtime (CPU, CUDA, TensorRT).")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    g = formats.add_parser("gguf", help="the language model as a GGUF file llama.cpp loads",
                           description="Write the LLM (Llama, Qwen2, Nemotron; text-only or a VLM's) as GGUF: "
                                       "AWQ checkpoints as Q4_1 blocks of the same integers and scales, 16-bit ones "
                                       "as F16/Q8_0 or through llama.cpp's quantizer (Q4_K_M, ...).")
    gguf_export.add_export_arguments(g)
    g.set_defaults(func=gguf_export.run_export)
    o = formats.add_parser("onnx", help="the vision tower and projector as ONNX files",
                           description="Write the vision tower (to its selected layer) with its projector as ONNX "
                                       "files (fp32, fp16, int8) with a dynamic batch axis.")
    onnx_cli.add_export_arguments(o)
    o.set_defaults(func=onnx_cli.run_export)


def add_generation_options(p, *, temperature: float = 0.2, max_new_tokens: int = 512) -> None:
    """How answers are sampled: one definition for every command that generates (chat, camera).

    `p` is a parser or an argument group; commands pick their own defaults (the camera wants
    short, repeatable answers). `generation_config(args)` turns the options into a GenerationConfig.
    """
    p.add_argument("--temperature", type=float, default=temperature, metavar="T",
                   help="randomness of the answer: 0 = greedy, the likeliest token each time, so the same "
                        f"answer on every run; 0.7-1 = more varied (default {temperature:g})")
    p.add_argument("--top-p", type=float, default=0.9, metavar="P",
                   help="sample only among the likeliest tokens that together make up P of the probability "
                        "(default 0.9)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample only among the K likeliest tokens (default 0: no limit)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="X",
                   help="above 1 makes tokens already in the text less likely, against loops (default 1.0: off)")
    p.add_argument("--seed", type=int, help="random seed: the same seed gives the same answer")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                   help=f"stop the answer after N tokens (default {max_new_tokens})")


def generation_config(args):
    """The GenerationConfig of the options `add_generation_options` added."""
    from .generate import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


def add_model_options(p, backend_flag: str = "--backend") -> None:
    """How the model is loaded. `backend_flag`: the camera command says `--llm-backend`, since its
    `--backend` chooses the capture backend."""
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="compute dtype (default: float16 on GPU, float32 on CPU)")
    p.add_argument("--max-context", type=int, help="context window in tokens (default: min(model limit, 4096))")
    p.add_argument("--template", help="chat template: nemovision, vicuna_v1, llama_3, chatml (default: the model's)")
    p.add_argument("--max-tiles", type=int,
                   help="InternVL / NVLM-D: the most 448 px tiles an image is cut into (default: the model's, 12 or "
                        "6); fewer tiles answer faster, 1 is one tile per image")
    p.add_argument("--vision-int8", action="store_true",
                   help="hold the vision tower's Linear weights in int8, one scale per output row, quantized as "
                        "they load (InternViT-6B: 11.8 -> 5.9 GB; features within 0.1%% of fp32 on the test tower)")
    p.add_argument("--kv-cache", choices=["model", "int8"], default="model",
                   help="KV-cache storage: the model's dtype (default) or int8, half the memory of fp16 for long "
                        "contexts (perplexity +0.3%% measured on SmolLM2)")
    p.add_argument("--vision-backend", choices=["torch", "onnx", "auto"], default="torch",
                   help="what runs the vision tower: torch (default), onnx (ONNX Runtime: TensorRT, CUDA or CPU int8, "
                        "exported once; needs edge-vlm[onnx]) or auto (ONNX Runtime where it is timed faster)")
    p.add_argument(backend_flag, dest="llm_backend", choices=["auto", "torch", "llama.cpp"], default="auto",
                   help="what runs the language model: llama.cpp from a GGUF exported once into ~/.cache/edge-vlm "
                        "(needs edge-vlm[llamacpp]; with CUDA, all layers on the GPU), or our torch decoder; "
                        "auto (default): llama.cpp on the CPU when llama-cpp-python is installed, else torch")


def _backend_line(requested: str, device: str | None) -> str:
    """What `chat --backend requested` would run the LLM on, and why."""
    from .backends.llamacpp.choice import llama_cpp_installed, resolve_llm_backend
    from .loader import default_device

    chosen = resolve_llm_backend(requested, device or default_device())
    state = "llama-cpp-python installed" if llama_cpp_installed() else \
        "llama-cpp-python missing: pip install 'edge-vlm[llamacpp]'"
    return (f"{chosen} (auto, {state})" if requested == "auto" else
            requested if requested == "torch" else f"{requested} ({state})")


def load_from_args(args):
    import torch

    from .loader import load_model

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load_model(args.model, device=args.device, dtype=dtype, max_context=args.max_context,
                      template=args.template, kv_cache=getattr(args, "kv_cache", None),
                      llm_backend=getattr(args, "llm_backend", "auto"),
                      vision_backend=getattr(args, "vision_backend", "torch"),
                      max_tiles=getattr(args, "max_tiles", None), vision_int8=getattr(args, "vision_int8", False))


def _stream(session, question, images, video, args) -> None:
    for piece in session.ask(question, images=images, video=video, frames=args.frames, gen=generation_config(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if not args.quiet:
        print(f"[{session.stats.summary()}]", file=sys.stderr)


def run_chat(args) -> int:
    from .errors import EdgeVLMError
    from .imaging.preprocess import load_image
    from .session import ChatSession

    images = [load_image(p) for p in args.image]  # fail on a bad image before loading the model
    if args.video and not Path(args.video).is_file():
        raise EdgeVLMError(f"video not found: {args.video}")
    model = load_from_args(args)
    session = ChatSession(model, system=args.system)
    if args.question is not None:
        _stream(session, args.question, images, args.video, args)
        return 0
    return _interactive(session, images, args)


def _interactive(session, images, args) -> int:
    from .errors import EdgeVLMError

    video = args.video
    print("edge-vlm chat: /image PATH, /video PATH, /reset, /quit", file=sys.stderr)
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            images, video = [], None
            print("(new conversation)", file=sys.stderr)
            continue
        if line.startswith("/image "):
            try:
                from .imaging.preprocess import load_image

                images.append(load_image(line[7:].strip()))
                print(f"(image attached: {len(images)} waiting for the next question)", file=sys.stderr)
            except EdgeVLMError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        if line.startswith("/video "):
            video = line[7:].strip()
            continue
        if line.startswith("/"):
            print("commands: /image PATH, /video PATH, /reset, /quit", file=sys.stderr)
            continue
        try:
            _stream(session, line, images, video, args)
            images, video = [], None
        except EdgeVLMError as e:  # the conversation goes on; the attachments are kept
            print(f"error: {e}", file=sys.stderr)


def run_info(args) -> int:
    import torch

    from .loader import load_model

    model = load_model(args.model, device="meta", dtype=torch.float16, max_context=args.max_context,
                       progress=False, kv_cache=args.kv_cache)
    i, cfg = model.info, model.llm.cfg
    mem = model.memory_estimate(args.max_context)
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    lines = [
        f"model:         {i.path}",
        f"layout:        {i.layout}",
        f"language:      {cfg.arch}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_heads}"
        f"/{cfg.num_kv_heads} kv, vocab {cfg.vocab_size}, {i.params.get('llm', 0) / 1e6:.1f}M params",
    ]
    if model.vision is not None:
        v = model.vision.cfg
        lines.append(f"vision:        {v.arch}, {v.image_size}px, patch {v.patch_size}, {len(model.vision.layers)} "
                     f"layers used, {i.params.get('vision', 0) / 1e6:.1f}M params")
        lines.append(f"projector:     {i.projector}, {model.tokens_per_image} tokens per image, "
                     f"{i.params.get('projector', 0) / 1e6:.1f}M params")
        lines.append(f"images:        {i.image_preparation}")
    lines += [
        f"quantization:  {i.quantization}",
        f"LLM backend:   {_backend_line(args.backend, getattr(args, 'device', None))}",
        *([f"vision backend: {args.vision_backend}"] if model.vision is not None else []),
        f"chat template: {model.template.name}",
        f"on disk:       {gib(i.weight_bytes)}",
        f"memory (fp16): weights {gib(mem['weights'])} + {'int8 ' if args.kv_cache == 'int8' else ''}KV cache "
        f"{gib(mem['kv_cache'])} at {args.max_context} tokens = {gib(mem['total'])}",
    ]
    print("\n".join(lines))
    return 0
