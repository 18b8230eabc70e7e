"""`edge-vlm bench`: end-to-end speed and memory on whatever device is present, ours vs a baseline."""

from __future__ import annotations

import sys
from pathlib import Path

from .shapes import LLM_SHAPES

CPU_REDUCED = dict(layers=2, vocab=8192, vision_layers=2, contexts="128,512", decode_steps=8)

EXAMPLES = """examples:
  edge-vlm bench --device cuda                                  # VILA1.5-3B shape, contexts 128 and 2048
  edge-vlm bench --device cuda --model-shape nemotron-mini-4b --max-context 4096 --quantize-lm-head --quantize-embedding \
      --kv-cache int8
  edge-vlm bench --device cuda --model-shape llama-3-8b --kernels
  edge-vlm bench --device cpu                                   # reduced size (2 layers), a few minutes
  edge-vlm bench --device cpu --llama-cpp --layers 4 --vision-layers 4   # + ours int4 on llama.cpp
"""


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure speed and memory (ours int4 vs dense eager torch)",
        description="Build a random-weight model of a real shape, then measure vision-tower latency, time to first "
                    "token of a 1-image prompt, decode tokens/s at each context, the share of the memory-bandwidth "
                    "floor reached and peak memory, for our int4 runtime path and for dense eager torch, in one run. "
                    "Prints a Markdown table and writes it with a PNG plot. On CPU the model is reduced (2 layers, "
                    "small vocabulary) unless --layers is given.",
        epilog=EXAMPLES, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--model-shape", default="vila1.5-3b", choices=sorted(LLM_SHAPES), help="(default vila1.5-3b)")
    p.add_argument("--layers", type=int, help="decoder layers (default: the model's; 2 on CPU)")
    p.add_argument("--vocab", type=int, help="vocabulary size (default: the model's; 8192 on CPU)")
    p.add_argument("--vision-layers", type=int, help="vision-tower layers (default: the model's; 2 on CPU)")
    p.add_argument("--contexts", help="decode contexts, comma-separated (default 128,2048; 128,512 on CPU)")
    p.add_argument("--decode-steps", type=int, help="decode steps timed per context (default 64; 8 on CPU)")
    p.add_argument("--max-context", type=int, default=4096, help="KV cache size, counted in peak memory (default 4096)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of TTFT and vision timing (best kept; default 3)")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="ours with an int4 lm_head, as `edge-vlm quantize --quantize-lm-head` writes (big vocabularies)")
    p.add_argument("--quantize-embedding", action="store_true",
                   help="ours with int8 token embeddings, as `edge-vlm quantize --quantize-embedding` writes")
    p.add_argument("--kv-cache", choices=["model", "int8"], default="model",
                   help="ours with an int8 KV cache (`edge-vlm chat --kv-cache int8`); default the model's dtype")
    p.add_argument("--llama-cpp", action="store_true",
                   help="also time ours int4 on llama.cpp (the same weights as a Q4_1-AWQ GGUF; needs edge-vlm[llamacpp]); "
                        "the vocabulary becomes at least 49152, the exported tokenizer's")
    p.add_argument("--kernels", action="store_true", help="also print the per-layer GEMV kernel table")
    p.add_argument("--out", default="bench-results", help="folder for the table (.md) and plot (.png)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from edge_vlm.errors import EdgeVLMError

    from .bench_e2e import format_table
    from .bench_e2e import run as run_e2e
    from .bench_kernels import device_name
    from .plot import bar_chart

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EdgeVLMError("--device cuda asked for, but this torch sees no CUDA GPU")
    reduced = device.type == "cpu" and args.layers is None
    pick = lambda value, key, full: value if value is not None else (CPU_REDUCED[key] if reduced else full)  # noqa: E731
    layers, vocab = pick(args.layers, "layers", None), pick(args.vocab, "vocab", None)
    vision_layers = pick(args.vision_layers, "vision_layers", None)
    contexts = [int(c) for c in pick(args.contexts, "contexts", "128,2048").split(",")]
    steps = pick(args.decode_steps, "decode_steps", 64)
    if args.llama_cpp and vocab is not None:  # as run_e2e makes it: the exported tokenizer's size at least
        from .bench_e2e import LLAMA_CPP_VOCAB

        vocab = max(vocab, LLAMA_CPP_VOCAB)
    note = (f"Reduced for CPU: {layers} layers, vocab {vocab}, {vision_layers} vision layers." if reduced else
            f"Full widths, {layers} layers." if layers else "Full shape.")
    extras = [what for flag, what in ((args.quantize_lm_head, "int4 lm_head"),
                                      (args.quantize_embedding, "int8 embeddings"),
                                      (args.kv_cache == "int8", "an int8 KV cache")) if flag]
    if extras:
        note += f" Ours with {' and '.join(extras)}."
    if device.type == "cpu":  # what the runtime chose on this CPU (timed at load; EDGE_VLM_CPU_BF16 forces it)
        from edge_vlm.backends.cpu.int4_linear import cpu_int4_available
        from edge_vlm.backends.cpu.timing import cpu_bf16_matmul_is_faster, cpu_int4_compute_dtype

        act = str(cpu_int4_compute_dtype()).replace("torch.", "") if cpu_int4_available() else "n/a"
        note += f" Ours on this CPU: int4 matmul with {act} activations, vision tower in " \
                f"{'bfloat16' if cpu_bf16_matmul_is_faster() else 'float32'}."
    log = lambda msg: print(f"[bench] {msg}", file=sys.stderr)  # noqa: E731
    results, bw = run_e2e(args.model_shape, str(device), contexts, steps, layers, vocab, vision_layers,
                          args.max_context, args.repeats, progress=log, int4_lm_head=args.quantize_lm_head,
                          int8_embedding=args.quantize_embedding, kv_int8=args.kv_cache == "int8",
                          llama_cpp=args.llama_cpp)
    table = format_table(results, args.model_shape, device_name(device), bw, note)
    command = "edge-vlm " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "edge-vlm bench"
    text = f"`{command}`\n\n{table}\n"
    if args.kernels:
        from . import bench_kernels

        if device.type == "cuda":
            rows, kbw = bench_kernels.bench_cuda([args.model_shape], device)
            text += "\n" + bench_kernels.format_cuda(rows, kbw, device_name(device)) + "\n"
        else:
            rows, kbw = bench_kernels.bench_cpu([args.model_shape], reps=3)
            text += "\n" + bench_kernels.format_cpu(rows, kbw, device_name(device)) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.model_shape}-{device.type}"
    (out / f"{stem}.md").write_text(text)
    ctxs = sorted(results[0].decode_tps)
    png = bar_chart(out / f"{stem}.png", [
        {"title": "decode", "unit": "tok/s", "groups": [f"ctx {c}" for c in ctxs],
         "series": {r.variant: [r.decode_tps[c] for c in ctxs] for r in results}},
        {"title": "time to first token", "unit": "ms", "groups": ["1 image"],
         "series": {r.variant: [r.ttft_ms] for r in results}},
        {"title": "memory", "unit": "GB", "groups": [results[0].peak_kind],
         "series": {r.variant: [r.peak_bytes / 1e9] for r in results}},
    ], f"edge-vlm bench: {args.model_shape} on {device_name(device)}")
    print(f"wrote {out / (stem + '.md')} and {png}", file=sys.stderr)
    return 0
