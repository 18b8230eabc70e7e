"""The vision tower in bf16 vs fp32 on this CPU: latency for one image, and how far the features move.

What `optimize_for_device` decides on CPU (bf16 where dense bf16 matmuls are the faster ones),
measured on a random-weight tower of a real shape, both dtypes in one run.

    python -m edge_vlm.benchmarks.vision_dtype [--model-shape vila1.5-3b] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy

import torch

from .random_model import build_vision
from .shapes import VISION_SHAPES, vision_config
from .timing import wall_time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-shape", default="vila1.5-3b", choices=sorted(VISION_SHAPES))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    cfg = vision_config(args.model_shape, None)
    fp32 = build_vision(cfg, "cpu", torch.float32)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    out, ms = {}, {}
    with torch.inference_mode():
        for name, tower in (("float32", fp32), ("bfloat16", bf16)):
            out[name] = tower(pixels).float()  # warm-up, and the features compared below
            ms[name] = 1e3 * min(wall_time(lambda: tower(pixels), "cpu") for _ in range(args.repeats))
    ref, got = out["float32"], out["bfloat16"]
    rel = float((got - ref).norm() / ref.norm())
    cos = float(torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1)))
    print(f"{args.model_shape} vision tower, {cfg.num_layers} layers, {ref.shape[1]} tokens, CPU "
          f"{torch.get_num_threads()} threads, best of {args.repeats}\n")
    print("| dtype | one image ms | features vs fp32 (relative norm) | cosine |\n|---|---|---|---|")
    print(f"| float32 | {ms['float32']:.0f} | 0 | 1 |")
    print(f"| bfloat16 | {ms['bfloat16']:.0f} | {rel:.4f} | {cos:.5f} |")
    print(f"\nbf16 speed-up: {ms['float32'] / ms['bfloat16']:.2f}x")


if __name__ == "__main__":
    main()
