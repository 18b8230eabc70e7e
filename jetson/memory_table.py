"""Which Jetson Orin module fits which VLM: the table in jetson/README.md, computed, not guessed.

Each model is built on the meta device from its published shapes (no download, no weights; the
table in `edge_vlm.benchmarks.shapes` the benchmarks use too), in fp16 and with AWQ int4
(group 128) language-model linears, and sized with
`VisionLanguageModel.memory_estimate`: the same figure `edge-vlm info` prints (weights plus
the fp16 KV cache at the given context). Run: python jetson/memory_table.py [--context 4096]
"""

from __future__ import annotations

import argparse

from edge_vlm.benchmarks.shapes import LLM_SHAPES, VLMS, meta_vlm
from edge_vlm.config import QuantConfig

# Orin modules and their unified memory (CPU and GPU share it), in GB as NVIDIA states it.
MODULES = [("Nano 4GB", 4), ("Nano 8GB / NX 8GB", 8), ("NX 16GB", 16), ("AGX 32GB", 32), ("AGX 64GB", 64)]
# Left for L4T (headless), the CUDA context, PyTorch and activations; measure yours with tegrastats.
RESERVE_GB = 2.0
AWQ_INT4 = QuantConfig(bits=4, group_size=128)
# `edge-vlm quantize --quantize-lm-head --quantize-embedding`: for big vocabularies (Nemotron's 256k)
AWQ_INT4_BIG_VOCAB = QuantConfig(bits=4, group_size=128, quantize_lm_head=True, quantize_embedding=True)
WEIGHTS = [("fp16", None, False), ("int4 AWQ", AWQ_INT4, False)]
BIG_VOCAB_WEIGHTS = [("int4 AWQ + int4 lm_head + int8 embeddings", AWQ_INT4_BIG_VOCAB, False),
                     ("the same + int8 KV cache", AWQ_INT4_BIG_VOCAB, True)]
BIG_VOCAB = 100_000  # from here the 16-bit embedding and lm_head are worth shrinking too


def rows(context: int) -> list[tuple[str, str, float]]:
    """(model, weights label, total GB) with memory_estimate's figure at `context` tokens."""
    out = []
    for name, (llm_shape, _, _) in VLMS.items():
        weights = WEIGHTS + (BIG_VOCAB_WEIGHTS if LLM_SHAPES[llm_shape]["vocab_size"] >= BIG_VOCAB else [])
        for label, q, kv_int8 in weights:
            est = meta_vlm(name, q, kv_int8).memory_estimate(context)
            out.append((name, label, est["total"] / 1e9))
    return out


def table(context: int = 4096) -> str:
    head = "| model | weights | memory at " + f"{context} tokens | " + " | ".join(m for m, _ in MODULES) + " |"
    lines = [head, "|" + "---|" * (3 + len(MODULES))]
    for name, label, gb in rows(context):
        fits = ["yes" if gb + RESERVE_GB <= mem else "no" for _, mem in MODULES]
        lines.append(f"| {name} | {label} | {gb:.1f} GB | " + " | ".join(fits) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096, help="KV-cache size in tokens (default 4096)")
    print(table(p.parse_args(argv).context))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
