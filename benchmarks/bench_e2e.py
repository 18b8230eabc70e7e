"""End-to-end speed and memory: ours (int4 + the device's fast path) vs fp16 eager torch, one run.

Measures, for a model shape with random weights: vision-tower latency for one image, time to
first token of a 1-image prompt (vision tower + prefill of image and text tokens + first
logits), decode tokens/s at given contexts, the fraction of the bandwidth floor reached
(bytes one decode step must read / copy bandwidth measured in the same run), and peak memory.

- "float16 eager" ("float32 eager" on CPU, the CPU dtype): dense nn.Linear weights, the plain `TorchEngine`.
- "ours int4": AutoAWQ int4 weights (`WQLinear`), `optimize_for_device`, `make_engine`
  (CUDA: Triton W4A16 kernels + CUDA-graph decode; CPU: torch's int4 CPU matmul, and the vision
  tower in bf16 where that is faster).
- "ours int4 on llama.cpp" (`llama_cpp=True`): the same int4 weights exported as Q4_1-AWQ GGUF
  blocks and run by llama.cpp (`--backend llama.cpp`; all layers on the GPU under CUDA), the vision
  tower as in "ours int4". The export carries a real tokenizer (SmolLM2's, 49152 tokens), so the
  vocabulary is at least that.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch

from edge_vlm.backends import make_engine, optimize_for_device
from edge_vlm.backends.torch_engine import TorchEngine
from edge_vlm.models.kv_cache import kv_cache_bytes
from edge_vlm.vlm import weight_bytes

from .random_model import build_llm, build_vision
from .shapes import LLM_SHAPES, llm_config, vision_config
from .timing import bandwidth_share, copy_bandwidth, wall_time

DEFAULT_IMAGE_TOKENS = 196
TEXT_TOKENS = 32


@dataclass
class E2EResult:
    variant: str
    weight_bytes: int
    vision_ms: float | None
    ttft_ms: float
    decode_tps: dict[int, float] = field(default_factory=dict)
    floor_pct: dict[int, float] = field(default_factory=dict)
    peak_bytes: int = 0
    peak_kind: str = ""


def decode_bytes(llm, ctx: int, itemsize: int, kv_int8: bool = False) -> int:
    """Bytes one decode step must read: every weight the step uses (one row of the embedding
    table; for CPU int4 layers their packed copy, not the AWQ layer kept for prefill), plus
    the KV cache up to `ctx`."""
    unused = set()
    for m in llm.modules():
        if getattr(m, "reference", None) is not None:  # CpuInt4Linear's prefill fallback
            unused |= {id(t) for t in m.reference.buffers()}
    emb = list(llm.embed_tokens.parameters()) + list(llm.embed_tokens.buffers())  # fp16 or int8 + scales
    head = {id(t) for t in list(llm.lm_head.parameters()) + list(llm.lm_head.buffers())}
    unused |= {id(t) for t in emb} - head  # a tied table is read whole, as the lm_head
    seen = {id(t): t for t in list(llm.parameters()) + list(llm.buffers()) if id(t) not in unused}
    weights = sum(t.numel() * t.element_size() for t in seen.values())
    one_row = sum(t[0].numel() * t.element_size() for t in emb if id(t) not in head)
    cfg = llm.cfg
    kv = kv_cache_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, ctx, itemsize, kv_int8)
    return weights + one_row + kv


def run_variant(name: str, llm, engine: TorchEngine, vision, device, contexts, decode_steps: int, copy_bw: float,
                repeats: int, image_tokens: int = DEFAULT_IMAGE_TOKENS, kv_int8: bool = False) -> E2EResult:
    cfg = llm.cfg
    dtype = llm.dtype
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = cfg.hidden_size
    pixels = torch.randn(1, 3, vision.cfg.image_size, vision.cfg.image_size, generator=gen).to(device, dtype) \
        if vision is not None else None
    text = torch.randn(1, TEXT_TOKENS, hidden, generator=gen).to(device, dtype) * 0.02
    image = torch.randn(1, image_tokens, hidden, generator=gen).to(device, dtype) * 0.02

    vision_ms = None
    with torch.inference_mode():
        if vision is not None:
            vision(pixels)  # warm-up
            vision_ms = 1e3 * min(wall_time(lambda: vision(pixels), device) for _ in range(repeats))

        def first_token():
            engine.reset()
            if vision is not None:
                vision(pixels)  # its output feeds the projector; the LLM takes image-sized embeddings
            int(engine.prefill(torch.cat([image, text], 1)).argmax())

        first_token()  # warm-up (kernel compilation on CUDA)
        ttft = min(wall_time(first_token, device) for _ in range(repeats))

        result = E2EResult(name, weight_bytes(*(m for m in (llm, vision) if m is not None)),
                           vision_ms, ttft * 1e3)
        for ctx in contexts:
            engine.reset()
            prompt = torch.randn(1, ctx - 1, hidden, generator=gen).to(device, dtype) * 0.02
            for start in range(0, ctx - 1, 512):  # chunked prefill keeps CPU memory modest
                engine.prefill(prompt[:, start:start + 512])
            del prompt
            token = 1
            for _ in range(2):  # warm-up steps (graph capture), then back to ctx - 1 cached tokens
                engine.step(token)
            engine.rewind(ctx - 1)
            t = wall_time(lambda: [engine.step(token) for _ in range(decode_steps)], device)
            step_s = t / decode_steps
            result.decode_tps[ctx] = 1.0 / step_s
            result.floor_pct[ctx] = 100.0 * bandwidth_share(decode_bytes(llm, ctx, dtype.itemsize, kv_int8), step_s, copy_bw)
    return result


LLAMA_CPP_VOCAB = 49152  # SmolLM2's tokenizer, written into the GGUF


def llama_cpp_engine(llm, max_ctx: int, folder, kv_int8: bool):
    """`llm` (AWQ-layout int4) exported as Q4_1-AWQ GGUF into `folder` and loaded in llama.cpp."""
    from pathlib import Path

    from edge_vlm.backends.llamacpp.engine import LlamaCppEngine
    from edge_vlm.backends.llamacpp.gguf_export import export_gguf
    from edge_vlm.text.templates import ChatTemplate
    from edge_vlm.text.tokenizer import Tokenizer
    from edge_vlm.vlm import ModelInfo, VisionLanguageModel

    from .real_model import smollm2_folder

    tok = Tokenizer(smollm2_folder())
    model = VisionLanguageModel(llm, tok, ChatTemplate(tok.chat_template, "checkpoint", tok.bos_token, tok.eos_token),
                                ModelInfo("bench", "llm", llm.cfg.arch))
    path = export_gguf(model, Path(folder) / "bench-q4_1-awq.gguf", "q4_1-awq", progress=False)
    gpu_layers = -1 if llm.device.type == "cuda" else 0
    return LlamaCppEngine(path, max_ctx, n_gpu_layers=gpu_layers, kv_cache_int8=kv_int8), path.stat().st_size


def run(model: str, device: str, contexts=(128, 2048), decode_steps: int = 64, layers: int | None = None,
        vocab: int | None = None, vision_layers: int | None = None, max_context: int = 4096, repeats: int = 3,
        variants=("dense", "int4"), progress=print, int4_lm_head: bool = False,
        int8_embedding: bool = False, kv_int8: bool = False, llama_cpp: bool = False) -> tuple[list[E2EResult], float]:
    """The variants in one process, one after the other; `int4_lm_head` / `int8_embedding` apply
    to ours (what `edge-vlm quantize --quantize-lm-head / --quantize-embedding` writes), and so
    does `kv_int8` (`--kv-cache int8`). `llama_cpp` adds "ours int4 on llama.cpp" (a vocabulary of
    at least LLAMA_CPP_VOCAB for every variant, so all three run the same shape)."""
    import tempfile

    from .shapes import IMAGE_TOKENS  # counted on first use (seconds): not at import

    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    image_tokens = IMAGE_TOKENS.get(model, DEFAULT_IMAGE_TOKENS)
    if llama_cpp:
        variants = (*variants, "llama.cpp")
        vocab = max(vocab or LLM_SHAPES[model]["vocab_size"], LLAMA_CPP_VOCAB)
    max_ctx = max(max_context, max(contexts) + 4, image_tokens + TEXT_TOKENS + 1)
    cfg = llm_config(model, layers, vocab, max_positions=max_ctx)
    vcfg = vision_config(model, vision_layers)
    copy_bw = copy_bandwidth(dev)
    progress(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s on {dev}")
    results = []
    tmp = tempfile.TemporaryDirectory()  # the llama.cpp variant's GGUF
    for variant in variants:
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        int4, on_cpp = variant in ("int4", "llama.cpp"), variant == "llama.cpp"
        variant = "ours int4 on llama.cpp" if on_cpp else "ours int4" if int4 else \
            f"{str(dtype).replace('torch.', '')} eager"
        progress(f"building {variant} ({model}, {cfg.num_layers} layers)")
        llm = build_llm(cfg, dev, dtype, int4=int4, int4_lm_head=int4 and int4_lm_head,
                        int8_embedding=int4 and int8_embedding)
        vision = build_vision(vcfg, dev, dtype) if vcfg is not None else None
        swapped = {}
        if on_cpp:  # the GGUF is written from the AWQ layers, before any swap
            engine, gguf_bytes = llama_cpp_engine(llm, max_ctx, tmp.name, kv_int8)
            swapped = optimize_for_device(None, vision).counts
            swapped["llama.cpp Q4_1-AWQ"] = 1
        elif int4:  # the runtime's own dispatch, on the LLM and the vision tower (bf16 on some CPUs)
            fast = optimize_for_device(llm, vision, kv_cache_int8=kv_int8)
            swapped, engine = fast.counts, make_engine(llm, max_ctx, kv_int8, fast.report)
        else:
            engine = TorchEngine(llm, max_ctx)
        fast = ", ".join(f"{n} {kind}" for kind, n in swapped.items()) or "plain torch modules"
        progress(f"timing {variant} ({type(engine).__name__}, {fast})")
        r = run_variant(variant, llm, engine, vision, dev, contexts, decode_steps, copy_bw, repeats, image_tokens,
                        kv_int8 and int4 and not on_cpp)
        if on_cpp:  # llama.cpp holds the file's weights and an F16 (or Q8_0) KV cache
            kv = kv_cache_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, max_ctx, 2, kv_int8)
            # its floor: the file's bytes (16-bit tables: half of our fp32 lm_head), the embedding table
            # read one row a step, and its F16 KV cache up to the context
            table = cfg.vocab_size * cfg.hidden_size * 2
            for ctx, tps in r.decode_tps.items():
                step = gguf_bytes - table + cfg.hidden_size * 2 + \
                    kv_cache_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, ctx, 2, kv_int8)
                r.floor_pct[ctx] = 100.0 * bandwidth_share(step, 1.0 / tps, copy_bw)
            r.weight_bytes = gguf_bytes + (weight_bytes(vision) if vision is not None else 0)
            r.peak_bytes, r.peak_kind = r.weight_bytes + kv, "weights + KV cache"
            engine.close()
        elif dev.type == "cuda":
            r.peak_bytes, r.peak_kind = torch.cuda.max_memory_allocated(dev), "peak allocated"
        else:  # one process runs both variants: report what this variant holds (weights + KV cache)
            r.peak_bytes, r.peak_kind = r.weight_bytes + engine.cache.nbytes, "weights + KV cache"
        results.append(r)
        del engine, llm, vision
    tmp.cleanup()
    return results, copy_bw


def format_table(results: list[E2EResult], model: str, device_name: str, copy_bw: float, note: str = "") -> str:
    ctxs = sorted(results[0].decode_tps)
    head = ["variant", "vision ms", "TTFT ms (1 image)"] + [f"decode tok/s @{c}" for c in ctxs] + \
        [f"% of BW floor @{c}" for c in ctxs] + ["memory GB"]
    lines = [f"Model shape: {model}; device: {device_name}; copy bandwidth {copy_bw / 1e9:.1f} GB/s (same run). {note}",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        vis = f"{r.vision_ms:.1f}" if r.vision_ms is not None else "-"
        cells = [r.variant, vis, f"{r.ttft_ms:.1f}"] + [f"{r.decode_tps[c]:.2f}" for c in ctxs] + \
            [f"{r.floor_pct[c]:.0f}%" for c in ctxs] + [f"{r.peak_bytes / 1e9:.2f} ({r.peak_kind})"]
        lines.append("| " + " | ".join(cells) + " |")
    base = results[0]
    if len(results) > 1:
        lines.append("")
    for ours in results[1:]:
        ratio = ", ".join(f"@{c}: {ours.decode_tps[c] / base.decode_tps[c]:.2f}x" for c in ctxs)
        lines.append(f"Decode speed-up, {ours.variant} vs {base.variant}: {ratio}; TTFT ratio "
                     f"{base.ttft_ms / ours.ttft_ms:.2f}x; memory ratio {ours.peak_bytes / base.peak_bytes:.2f}.")
    return "\n".join(lines)
