"""Time to first token of a 1-image question, per backend pair, side by side in one run.

The question goes to the real SmolLM2-135M with a real-size random SigLIP-so400m-384 tower and
mlp_downsample projector (VILA1.5's vision side; random weights: speed depends on shapes), through
`ChatSession`, so the time is what a user waits: preprocessing, the tower, the projector, the prefill
of 196 image tokens and the text, the first sampled token. Rows: the path a fresh AVX2 machine ran
before the llama.cpp and ONNX backends (torch tower + torch LLM), today's default (torch tower +
llama.cpp LLM), and `--vision-backend onnx` (ONNX Runtime int8 tower + llama.cpp).

    python -m edge_vlm.benchmarks.image_question [--layers 27] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
from pathlib import Path

import torch

from edge_vlm import ChatSession, GenerationConfig, load_model
from edge_vlm.backends.onnx.encoder import OnnxVisionEncoder
from edge_vlm.backends.onnx.export import export_parts
from edge_vlm.backends.onnx.int8 import synthetic_images
from edge_vlm.backends.onnx.providers import CPU, ProviderPlan

from .real_model import smollm2_folder
from .vision_backends import cpu_facts, image_config, random_parts

QUESTION = "What is in this picture? Describe it in one sentence."


def with_vision(model, tower, projector, icfg, encoder=None):
    """`model` (a text-only SmolLM2) with the random tower attached, as a VILA folder would load it."""
    info = dataclasses.replace(model.info, vision_backend=encoder.describe() if encoder is not None else "torch")
    return model.replace(vision=tower, projector=projector, image_cfg=icfg, encoder=encoder, info=info)


def ttft(model, repeats: int) -> tuple[float, str]:
    """Median time to first token over `repeats` fresh sessions after a warm-up, and the stats line."""
    gen = GenerationConfig(max_new_tokens=1, temperature=0)
    image = synthetic_images(1, seed=3)[0]
    times, summary = [], ""
    for i in range(repeats + 1):
        session = ChatSession(model)
        session.answer(QUESTION, images=[image], gen=gen)
        if i:  # the first run warms up (weight packing, llama.cpp's graph)
            times.append(session.stats.ttft_s)
        summary = session.stats.summary()
    return statistics.median(times), summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, help="tower layers to build (default: the real 27; fewer for a quick run)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    facts = cpu_facts()
    folder = smollm2_folder()
    tower, projector = random_parts("vila1.5-3b", args.layers, llm_hidden=576)
    icfg = image_config(tower.cfg)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print("exporting the tower to ONNX (fp32 -> int8) ...", flush=True)
        files = export_parts(tower, projector, icfg, Path(tmp), ("int8",), "dynamic")
        encoder = OnnxVisionEncoder.open(files["int8"], icfg, ProviderPlan([(CPU, {})], "int8"), "cpu", torch.float32)
        for label, llm_backend, enc in (("torch tower + torch LLM (before the backends)", "torch", None),
                                        ("torch tower + llama.cpp LLM (today's default)", "llama.cpp", None),
                                        ("ONNX Runtime int8 tower + llama.cpp LLM (--vision-backend onnx)",
                                         "llama.cpp", encoder)):
            model = with_vision(load_model(folder, device="cpu", progress=False, llm_backend=llm_backend),
                                tower, projector, icfg, enc)
            t, summary = ttft(model, args.repeats)
            print(f"  {label}: {t * 1e3:.0f} ms  [{summary}]", flush=True)
            rows.append((label, t))
    base = rows[0][1]
    print(f"\nCPU: {facts['name']}, {facts['cores']} threads, {' '.join(facts['flags'])}; SmolLM2-135M + SigLIP-so400m-384 "
          f"({tower.cfg.layers_used} layers used, random) + mlp_downsample; median of {args.repeats} after a warm-up; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| path | time to first token | vs the first row |")
    print("|---|---|---|")
    for label, t in rows:
        print(f"| {label} | {t * 1e3:.0f} ms | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
