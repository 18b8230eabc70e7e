"""End-to-end speed and memory: ours (int4 + the device's fast path) vs fp16 eager torch, one run.

Measures, for a model shape with random weights: vision-tower latency for one image, time to
first token of a 1-image prompt (vision tower + prefill of image and text tokens + first
logits), decode tokens/s at given contexts, the fraction of the bandwidth floor reached
(bytes one decode step must read / copy bandwidth measured in the same run), and peak memory.

- "float16 eager" ("float32 eager" on CPU, the CPU dtype): dense nn.Linear weights, the plain `Engine`.
- "ours int4": AutoAWQ int4 weights (`WQLinear`), `optimize_for_device`, `make_engine`
  (CUDA: Triton W4A16 kernels + CUDA-graph decode; CPU: torch's int4 CPU matmul, and the vision
  tower in bf16 where that is faster).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from edge_vlm.backends import make_engine, optimize_for_device
from edge_vlm.generate import Engine
from edge_vlm.kv_cache import kv_cache_bytes
from edge_vlm.vlm import weight_bytes

from .random_model import build_llm, build_vision
from .shapes import llm_config, vision_config
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


def decode_bytes(llm, ctx: int, itemsize: int) -> int:
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
    kv = kv_cache_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, ctx, itemsize, llm.kv_cache_int8)
    return weights + one_row + kv


def run_variant(name: str, llm, engine: Engine, vision, device, contexts, decode_steps: int, copy_bw: float,
                repeats: int, image_tokens: int = DEFAULT_IMAGE_TOKENS) -> E2EResult:
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
            result.floor_pct[ctx] = 100.0 * bandwidth_share(decode_bytes(llm, ctx, dtype.itemsize), step_s, copy_bw)
    return result


def run(model: str, device: str, contexts=(128, 2048), decode_steps: int = 64, layers: int | None = None,
        vocab: int | None = None, vision_layers: int | None = None, max_context: int = 4096, repeats: int = 3,
        variants=("dense", "int4"), progress=print, int4_lm_head: bool = False,
        int8_embedding: bool = False, kv_int8: bool = False) -> tuple[list[E2EResult], float]:
    """Both variants in one process, one after the other; `int4_lm_head` / `int8_embedding` apply
    to ours (what `edge-vlm quantize --quantize-lm-head / --quantize-embedding` writes), and so
    does `kv_int8` (`--kv-cache int8`)."""
    from .shapes import IMAGE_TOKENS  # counted on first use (seconds): not at import

    dev = torch.device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    image_tokens = IMAGE_TOKENS.get(model, DEFAULT_IMAGE_TOKENS)
    max_ctx = max(max_context, max(contexts) + 4, image_tokens + TEXT_TOKENS + 1)
    cfg = llm_config(model, layers, vocab, max_positions=max_ctx)
    vcfg = vision_config(model, vision_layers)
    copy_bw = copy_bandwidth(dev)
    progress(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s on {dev}")
    results = []
    for variant in variants:
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        int4 = variant == "int4"
        variant = "ours int4" if int4 else f"{str(dtype).replace('torch.', '')} eager"
        progress(f"building {variant} ({model}, {cfg.num_layers} layers)")
        llm = build_llm(cfg, dev, dtype, int4=int4, int4_lm_head=int4 and int4_lm_head,
                        int8_embedding=int4 and int8_embedding)
        vision = build_vision(vcfg, dev, dtype) if vcfg is not None else None
        swapped = {}
        if int4:  # the runtime's own dispatch, on the LLM and the vision tower (bf16 on some CPUs)
            swapped = optimize_for_device(SimpleNamespace(llm=llm, vision=vision))
            llm.kv_cache_int8 = kv_int8
            engine = make_engine(llm, max_ctx)
        else:
            engine = Engine(llm, max_ctx)
        fast = ", ".join(f"{n} {kind}" for kind, n in swapped.items()) or "plain torch modules"
        progress(f"timing {variant} ({type(engine).__name__}, {fast})")
        r = run_variant(variant, llm, engine, vision, dev, contexts, decode_steps, copy_bw, repeats, image_tokens)
        if dev.type == "cuda":
            r.peak_bytes, r.peak_kind = torch.cuda.max_memory_allocated(dev), "peak allocated"
        else:  # one process runs both variants: report what this variant holds (weights + KV cache)
            r.peak_bytes, r.peak_kind = r.weight_bytes + engine.cache.nbytes, "weights + KV cache"
        results.append(r)
        del engine, llm, vision
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
    if len(results) == 2:
        base, ours = results
        ratio = ", ".join(f"@{c}: {ours.decode_tps[c] / base.decode_tps[c]:.2f}x" for c in ctxs)
        lines += ["", f"Decode speed-up, ours vs {base.variant}: {ratio}; TTFT ratio "
                      f"{base.ttft_ms / ours.ttft_ms:.2f}x; memory ratio {ours.peak_bytes / base.peak_bytes:.2f}."]
    return "\n".join(lines)
