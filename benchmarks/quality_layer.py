"""One real decoder layer, every quantization variant, per held-out domain: a quick ablation.

The whole-model table (benchmarks/quality.py) costs minutes per row on a small CPU; this scores
the variants on one layer of the real SmolLM2 (the layers before it in 16-bit), calibrated on the
built-in mix and measured on each evaluation domain by the layer's relative output error
|out_q - out| ^2 / |out - x|^2 (x 1e3). It ranks variants; perplexity decides.

    python -m edge_vlm.benchmarks.quality_layer --layer 2
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch


def main(argv=None) -> int:
    from edge_vlm.formats.checkpoint import TensorStore, load_into
    from edge_vlm.formats.configs import LLMConfig
    from edge_vlm.models.llm import DecoderLayer
    from edge_vlm.quantize.awq import AWQOptions, LayerRunner, quantize_layer_awq, quantize_layer_rtn
    from edge_vlm.quantize.calibration import builtin_blocks
    from edge_vlm.quantize.pipeline import chat_template_of
    from edge_vlm.tokenizer import Tokenizer

    from .real_model import smollm2_folder
    from .text_domains import domain_ids

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--search-tokens", type=int, default=2048)
    a = p.parse_args(argv)
    f = smollm2_folder()
    cfg = LLMConfig.from_hf(json.loads((f / "config.json").read_text()))
    store, tok = TensorStore(f), Tokenizer(f)
    template = chat_template_of(tok, cfg.arch)
    s = a.seqlen
    ids, _ = builtin_blocks(tok.encode, a.n_samples, s, template)
    emb = store.get("model.embed_tokens.weight").float()
    x = emb[ids]
    held = {k: emb[torch.tensor(v).view(-1, s)] for k, v in domain_ids(tok.encode, 1024, template, piece=s).items()}
    runner = LayerRunner(cfg, s, "cpu")
    common = dict(group_size=64, search_tokens=a.search_tokens)
    variants = {
        "awq-v1 (token losses, clip on 512 tokens)": AWQOptions(hessian=False, **common),
        "awq-clip (H losses and clipping)": AWQOptions(**common),
        "awq-noclip": AWQOptions(clip=False, **common),
        "awq-clip-damp 0.1": AWQOptions(clip_damp=0.1, **common),
        "gptq (no scales)": AWQOptions(scale_search=False, rounding="gptq", **common),
        "awq (scales + gptq rounding)": AWQOptions(rounding="gptq", **common),
        "awq, no duo scaling": AWQOptions(rounding="gptq", duo_scaling=False, **common),
        "awq, 10-point scale grid": AWQOptions(rounding="gptq", n_grid=10, **common),
    }

    def load(i):
        with torch.device("meta"):
            layer = DecoderLayer(cfg)
        pre = f"model.layers.{i}."
        load_into(layer, store, lambda k: k[len(pre):] if k.startswith(pre) else None, torch.float32, "cpu")
        return layer

    for i in range(a.layer):  # the 16-bit layers before it
        layer = load(i)
        x, held = runner(layer, x), {k: runner(layer, v) for k, v in held.items()}
    base = load(a.layer)
    want = {k: runner(base, v) for k, v in held.items()}

    def err(layer):
        return {k: 1e3 * float((runner(layer, held[k]) - want[k]).pow(2).mean() / (want[k] - held[k]).pow(2).mean())
                for k in held}

    print("| variant | " + " | ".join(held) + " | seconds |")
    print("|" + "---|" * (len(held) + 2))
    rtn = copy.deepcopy(base)
    quantize_layer_rtn(rtn, AWQOptions(group_size=64))
    print("| rtn | " + " | ".join(f"{v:.2f}" for v in err(rtn).values()) + " | - |")
    for name, opts in variants.items():
        layer = copy.deepcopy(base)
        t = time.perf_counter()
        quantize_layer_awq(layer, cfg, x, runner, opts)
        dt = time.perf_counter() - t
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in err(layer).values()) + f" | {dt:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
