"""The vision tower + projector on each CPU backend, side by side in one run: torch fp32, torch bf16 (where
the CPU has bf16 instructions), ONNX Runtime fp32, int8 (dynamic, the default) and int8 (static).

Real-size towers with random weights (speed depends on shapes, not values), one image and an 8-frame
video (one batch), ms per image, and each backend's feature cosine to torch fp32 (the smallest over the
images). Beside it, the physical floor: the tower's FLOPs per image over the CPU's peak FMA throughput.

    python -m edge_vlm.benchmarks.vision_backends [--model-shape vila1.5-3b nemotron-mini-4b] [--repeats 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from edge_vlm.backends.onnx.choice import AUTO_MIN_SPEEDUP, cpu_int8_speedup
from edge_vlm.backends.onnx.encoder import OnnxVisionEncoder
from edge_vlm.backends.onnx.export import VisionGraph, export_parts
from edge_vlm.backends.onnx.int8 import calibration_pixels, check_pixels, cosine, quantize, synthetic_images
from edge_vlm.backends.onnx.providers import CPU, ProviderPlan
from edge_vlm.formats.configs import ImageConfig, ProjectorConfig
from edge_vlm.formats.image_processor_config import settings_image_config
from edge_vlm.imaging.preprocess import preprocess
from edge_vlm.models.projector import Projector
from edge_vlm.models.vision import VisionTower

from .shapes import BENCH_VLMS, LLM_SHAPES, VLMS, vision_config
from .timing import wall_time

FRAMES = 8


def random_parts(name: str, layers: int | None = None, seed: int = 0, llm_hidden: int | None = None):
    """Tower + projector of a bench shape with weights that keep every layer working: unit LayerNorm gains,
    weights ~ N(0, 1/fan_in), small biases. (random_model.build_vision zeroes norms, convs and biases, which
    is fine for speed but makes every image give the same features: useless for a cosine.) `llm_hidden`
    projects to another LLM's width (a real small LLM in the image-question benchmark)."""
    cfg = vision_config(name, layers)
    kind, hidden = "mlp_downsample", 64
    if name in BENCH_VLMS:
        llm, _, kind = VLMS[BENCH_VLMS[name]]
        hidden = LLM_SHAPES[llm]["hidden_size"]
    hidden = llm_hidden or hidden
    tower, projector = VisionTower(cfg), Projector(ProjectorConfig(kind, cfg.hidden_size, hidden))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (tower, projector):
            for pname, p in module.named_parameters():
                if p.dim() == 1:
                    base = 1.0 if "norm" in pname and pname.endswith("weight") else 0.0
                    p.copy_(base + 0.02 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
    return tower.eval(), projector.eval()


def image_config(cfg) -> ImageConfig:
    """The real preprocessing of the shape's tower: SigLIP squashes to a square, CLIP crops the short side."""
    side = {"height": cfg.image_size, "width": cfg.image_size}
    if cfg.arch == "siglip":
        return settings_image_config({"size": side}, "SiglipImageProcessor")
    return settings_image_config({"size": {"shortest_edge": cfg.image_size}, "crop_size": side}, "CLIPImageProcessor")


def tower_flops(tower: VisionTower, projector: Projector) -> float:
    """2 x the multiply-adds of one image: patch embedding, the layers used (projections, MLP, attention), projector."""
    c = tower.cfg
    t = c.num_patches + (1 if c.arch == "clip" else 0)
    d, f = c.hidden_size, c.intermediate_size
    per_layer = 2 * t * (4 * d * d + 2 * d * f) + 2 * 2 * t * t * d
    embed = 2 * c.num_patches * 3 * c.patch_size ** 2 * d
    tokens = tower.num_tokens
    proj_tokens = projector.num_tokens(tokens)
    proj = sum(2 * (proj_tokens if projector.downsample else tokens) * lin.in_features * lin.out_features
               for lin in projector.linears)
    return embed + c.layers_used * per_layer + proj


def cpu_facts() -> dict:
    """Model name, flags that matter, and the peak fp32 FMA throughput computed from them."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    field = lambda key: next((line.split(":", 1)[1].strip() for line in info.splitlines()  # noqa: E731
                              if line.startswith(key)), "")
    flags = set(field("flags").split())
    family, model = int(field("cpu family") or 0), int(field("model") or 0)
    mhz = float(field("cpu MHz") or 0)
    cores = torch.get_num_threads()
    if "avx512f" in flags:
        per_cycle, why = 64, "2 x 512-bit FMA"
    elif "fma" in flags and field("vendor_id") == "AuthenticAMD" and family == 23 and model < 0x30:
        per_cycle, why = 16, "AMD Zen 1/Zen+ (family 23, model < 0x30): 2 x 128-bit FMA, AVX2 split in halves"
    elif "fma" in flags:
        per_cycle, why = 32, "2 x 256-bit FMA"
    else:
        per_cycle, why = 8, "no FMA"
    bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    keep = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                        "amx_int8") if f in flags]
    return {"name": field("model name") or platform.processor(), "family": family, "model": model, "mhz": mhz,
            "cores": cores, "flags": keep, "bf16": bf16, "peak": cores * per_cycle * mhz * 1e6, "why": why,
            "per_cycle": per_cycle}


def measured_sgemm() -> float:
    """FLOP/s of a large fp32 matmul in torch (the practical ceiling the peak is checked against)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    return 2 * 2048 ** 3 / min(wall_time(lambda: torch.mm(a, b), "cpu") for _ in range(3))


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result) of one call; CPU time counts every thread of ours
    (ONNX Runtime's and torch's pools run in-process) and little of the other processes sharing the cores."""
    cpu = time.process_time()
    out = {}
    wall = wall_time(lambda: out.__setitem__("r", fn()), "cpu")
    return wall, time.process_time() - cpu, out["r"]


def bench_shape(name: str, layers: int | None, repeats: int, tmp: Path) -> list[str]:
    tower, projector = random_parts(name, layers)
    cfg, icfg = tower.cfg, image_config(tower.cfg)
    one = preprocess(synthetic_images(1, seed=10), icfg)
    video = preprocess(synthetic_images(FRAMES, seed=11), icfg)
    facts = cpu_facts()
    print(f"{name}: {cfg.arch} {cfg.image_size}px, {cfg.layers_used} layers used, {projector.cfg.kind}", flush=True)
    runs = {"torch fp32": VisionGraph(tower, projector)}
    if facts["bf16"]:
        bf = VisionGraph(*(copy.deepcopy(m).bfloat16() for m in (tower, projector)))
        runs["torch bf16"] = lambda x: bf(x.bfloat16())
    out = tmp / name
    files = export_parts(tower, projector, icfg, out, ("fp32", "int8"), "dynamic")
    static = out / "vision-int8-static.onnx"
    static_info = quantize(files["fp32"], static, calibration_pixels(icfg), check_pixels(icfg), "static")
    for label, path, precision in (("ORT fp32", files["fp32"], "fp32"), ("ORT int8 dynamic", files["int8"], "int8"),
                                   ("ORT int8 static", static, "int8")):
        runs[label] = OnnxVisionEncoder.open(path, icfg, ProviderPlan([(CPU, {})], precision), "cpu",
                                             torch.float32).encode_pixels
    # round robin, so a change in the machine's load between backends shows in every row alike
    one_out, best, video_t = {}, {}, {}
    with torch.inference_mode():
        for label, run in runs.items():
            one_out[label] = run(one).float()  # warm-up: allocations, weight packing
        for _ in range(repeats):
            for label, run in runs.items():
                wall, cpu, _ = timed(lambda: run(one))
                best[label] = min(best.get(label, (wall, cpu)), (wall, cpu))
        video_out = {}
        for label, run in runs.items():
            wall, cpu, video_out[label] = timed(lambda: run(video))
            video_t[label] = (wall / FRAMES, cpu / FRAMES)
            print(f"  {label}: {best[label][0] * 1e3:.0f} ms/image ({best[label][1]:.1f} CPU-s), video "
                  f"{video_t[label][0] * 1e3:.0f} ms/frame", flush=True)
    ref1, refv = one_out["torch fp32"], video_out["torch fp32"].float()
    rows = {label: (best[label][0] * 1e3, best[label][1], video_t[label][0] * 1e3, video_t[label][1],
                    min(cosine(one_out[label], ref1), cosine(video_out[label].float(), refv))) for label in runs}
    speedup = cpu_int8_speedup(tower.num_tokens, cfg.hidden_size, cfg.intermediate_size, torch.float32)
    flops = tower_flops(tower, projector)
    base, base_cpu = rows["torch fp32"][0], rows["torch fp32"][1]
    lines = [f"### {name}: {cfg.arch} {cfg.image_size}px + {projector.cfg.kind}, {cfg.layers_used} layers used, "
             f"{flops / 1e9:.0f} GFLOP per image", "",
             "| backend | 1 image ms | CPU-s | 8-frame video ms/frame | CPU-s/frame | vs torch fp32 (ms, CPU-s) "
             "| feature cosine vs torch fp32 |",
             "|---|---|---|---|---|---|---|"]
    for label, (t1, c1, tv, cv, cos) in rows.items():
        lines.append(f"| {label} | {t1:.0f} | {c1:.1f} | {tv:.0f} | {cv:.1f} | {base / t1:.2f}x, {base_cpu / c1:.2f}x "
                     f"| {cos:.5f} |")
    if not facts["bf16"]:
        lines.append("| torch bf16 | n/a | | n/a | | n/a | this CPU has no AVX512-BF16 / AMX: bf16 would be emulated |")
    floor = flops / facts["peak"] * 1e3
    lines += ["", f"static int8's own check on held-out images: cosine {static_info['cosine']:.5f}; "
                  f"ONNX Runtime int8 vs torch fp32 matmul probe (`auto`'s rule, switch at "
                  f">= {AUTO_MIN_SPEEDUP}x): {speedup:.2f}x -> auto chooses "
                  f"{'onnx' if speedup >= AUTO_MIN_SPEEDUP else 'torch'}",
              f"physical floor (fp32): {flops / 1e9:.0f} GFLOP / {facts['peak'] / 1e9:.0f} GFLOP/s = {floor:.0f} ms "
              f"per image; best measured is {min(r[0] for r in rows.values()) / floor:.2f}x the floor", ""]
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-shape", nargs="+", default=["vila1.5-3b", "nemotron-mini-4b"],
                   choices=sorted(set(BENCH_VLMS) | {"tiny"}))
    p.add_argument("--layers", type=int, help="build only this many layers (quick runs; not a published figure)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of timed one-image runs after the warm-up (the best is kept)")
    args = p.parse_args(argv)
    facts = cpu_facts()
    print(f"CPU: {facts['name']} (family {facts['family']} model {facts['model']}), {facts['cores']} threads, "
          f"{facts['mhz']:.0f} MHz, flags {' '.join(facts['flags'])}; torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    sgemm = measured_sgemm()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.model_shape:
            lines += bench_shape(name, args.layers, args.repeats, Path(tmp))
    print()
    print(f"CPU: {facts['name']}, {facts['cores']} threads at {facts['mhz']:.0f} MHz, {' '.join(facts['flags'])}; "
          f"bf16 instructions: {', '.join(facts['bf16']) or 'none'}")
    print(f"peak fp32 FMA: {facts['cores']} cores x {facts['per_cycle']} FLOP/cycle ({facts['why']}) x "
          f"{facts['mhz'] / 1e3:.2f} GHz = {facts['peak'] / 1e9:.0f} GFLOP/s; a 2048^3 torch matmul measured "
          f"{sgemm / 1e9:.0f} GFLOP/s now; load average {os.getloadavg()[0]:.1f} at the end\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
