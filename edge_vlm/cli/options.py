"""The options every command that loads a model or generates shares (chat, serve, camera, app): one
definition each, so `--temperature` or `--backend` means the same everywhere."""

from __future__ import annotations

import argparse

import torch

from ..backends.llamacpp.choice import MODES as LLM_BACKENDS
from ..backends.llamacpp.choice import llama_cpp_installed, resolve_llm_backend
from ..backends.onnx.choice import MODES as VISION_BACKENDS
from ..generate import GenerationConfig
from ..loading import default_device, load_model
from ..models.kv_cache import KV_CACHE_KINDS

DEFAULT_MODEL = "Efficient-Large-Model/VILA1.5-3b-AWQ"  # 4-bit LLM (TinyChat .pt), 16-bit vision


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
                   help="tiled models (InternVL, NVLM-D, NVILA): the most tiles an image is cut into (default: "
                        "the model's own, e.g. 12 or 6); fewer tiles answer faster (InternVL: 1 is one tile per image)")
    p.add_argument("--vision-int8", action="store_true",
                   help="hold the vision tower's Linear weights in int8, one scale per output row, quantized as "
                        "they load (InternViT-6B: 11.8 -> 5.9 GB; features within 0.1%% of fp32 on the test tower)")
    p.add_argument("--kv-cache", choices=KV_CACHE_KINDS, default="model",
                   help="KV-cache storage: the model's dtype (default) or int8, half the memory of fp16 for long "
                        "contexts (perplexity +0.3%% measured on SmolLM2)")
    p.add_argument("--vision-backend", choices=VISION_BACKENDS, default="torch",
                   help="what runs the vision tower: torch (default), onnx (ONNX Runtime: TensorRT, CUDA or CPU int8, "
                        "exported once; needs edge-vlm[onnx]) or auto (ONNX Runtime where it is timed faster)")
    p.add_argument(backend_flag, dest="llm_backend", choices=LLM_BACKENDS, default="auto",
                   help="what runs the language model: llama.cpp from a GGUF exported once into ~/.cache/edge-vlm "
                        "(needs edge-vlm[llamacpp]; with CUDA, all layers on the GPU), or our torch decoder; "
                        "auto (default): llama.cpp on the CPU when llama-cpp-python is installed, else torch")
    # Default: every core this process may use (llama.cpp's fastest on an idle machine, and what it
    # ran before the option existed); the right number under a competing load is unmeasured, so the
    # user who knows their machine is busy picks it.
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads llama.cpp runs the language model on, for prompts and for each token "
                        "(default: every core this process may use); fewer leave cores to other programs")


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (one clear line otherwise)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def backend_line(requested: str, device: str | None) -> str:
    """What `chat --backend requested` would run the LLM on, and why."""
    chosen = resolve_llm_backend(requested, device or default_device())
    state = "llama-cpp-python installed" if llama_cpp_installed() else \
        "llama-cpp-python missing: pip install 'edge-vlm[llamacpp]'"
    return (f"{chosen} (auto, {state})" if requested == "auto" else
            requested if requested == "torch" else f"{requested} ({state})")


def load_from_args(args):
    """The model the options `add_model_options` added ask for."""
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load_model(args.model, device=args.device, dtype=dtype, max_context=args.max_context,
                      template=args.template, kv_cache=getattr(args, "kv_cache", None),
                      llm_backend=getattr(args, "llm_backend", "auto"),
                      vision_backend=getattr(args, "vision_backend", "torch"),
                      max_tiles=getattr(args, "max_tiles", None), vision_int8=getattr(args, "vision_int8", False),
                      llm_threads=getattr(args, "threads", None))


