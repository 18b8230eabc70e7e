"""Kernel table: int4 GEMV (one decode token) per linear shape, against the memory floor and baselines.

CUDA: our Triton W4A16 GEMV vs fp16 `torch.matmul` vs tinygemm (`torch.ops.aten._weight_int4pack_mm`,
bf16) where this torch has it; achieved GB/s vs a device-to-device copy measured in the same run.
CPU: the runtime's CPU path (torch's int4 CPU matmul, `_weight_int4pack_mm_for_cpu`, with bf16 and with fp32
activations) vs the reference dequantize+matmul (`WQLinear.forward`) vs a dense fp32 matmul, at 1 row (decode) and
128 rows (a prompt): what `CpuInt4Linear` chooses between. The Triton kernels are not timed on CPU (the interpreter is for tests).

    python -m edge_vlm.benchmarks.bench_kernels --device cuda             # all three model shapes, + decode attention vs SDPA
    python -m edge_vlm.benchmarks.bench_kernels --device cpu --models vila1.5-3b
"""

from __future__ import annotations

import argparse
import sys

import torch

from .random_model import GROUP, int4_weight_for_bench, random_awq_linear
from .shapes import FIGURE_SHAPES, LLM_SHAPES, linear_shapes, llm_config
from .timing import bandwidth_share, copy_bandwidth, median_time


def _tinygemm(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor):
    """(packed, scales_and_zeros) for torch's CUDA int4 matmul, or None if this torch lacks it."""
    try:
        k, n = q.shape
        qt = q.t().contiguous().to(torch.int32)  # [N, K]
        u8 = ((qt[:, ::2] << 4) | qt[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
        sz = torch.stack([s.float(), (8 - z.float()) * s.float()], -1).to(torch.bfloat16).contiguous()
        x = torch.randn(1, k, device=q.device, dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, sz)
        return packed, sz
    except Exception as e:  # older/newer torch signatures, or a GPU it does not support
        print(f"tinygemm unavailable: {str(e).splitlines()[0][:100]}", file=sys.stderr)
        return None


def bench_cuda(models: list[str], device: torch.device) -> tuple[list[dict], float]:
    from edge_vlm.backends.triton.w4a16 import w4a16_matmul

    bw = copy_bandwidth(device)
    rows = []
    for model in models:
        for label, k, n in linear_shapes(model):
            w, (q, z, s) = int4_weight_for_bench(k, n, device)
            x = torch.randn(1, k, device=device, dtype=torch.float16)
            out = torch.empty(1, n, device=device, dtype=torch.float16)
            t_ours = median_time(lambda: w4a16_matmul(x, w, out=out), device)
            dense = torch.randn(k, n, device=device, dtype=torch.float16)
            t_fp16 = median_time(lambda: torch.matmul(x, dense), device)
            del dense
            tg = _tinygemm(q, z, s)
            t_tg = None
            if tg is not None:
                xb = x.to(torch.bfloat16)
                t_tg = median_time(lambda: torch.ops.aten._weight_int4pack_mm(xb, tg[0], GROUP, tg[1]), device)
            nbytes = w.nbytes + (k + n) * 2
            rows.append(dict(model=model, layer=label, k=k, n=n, ours_us=t_ours * 1e6, ours_gbs=nbytes / t_ours / 1e9,
                             pct_copy=100 * bandwidth_share(nbytes, t_ours, bw), fp16_us=t_fp16 * 1e6,
                             fp16_gbs=(k * n * 2) / t_fp16 / 1e9, tinygemm_us=t_tg * 1e6 if t_tg else None))
            del w, q, z, s
    return rows, bw


def bench_cpu(models: list[str], reps: int) -> tuple[list[dict], float]:
    """Per layer: torch's int4 CPU matmul with bf16 and with fp32 activations, the reference
    dequantize+matmul, and a dense fp32 matmul, at 1 row (decode) and 128 rows (a prompt)."""
    from edge_vlm.backends.cpu.int4_linear import CpuInt4Linear

    device = torch.device("cpu")
    bw = copy_bandwidth(device)
    rows = []
    for model in models:
        for label, k, n in linear_shapes(model):
            ref = random_awq_linear(k, n, device, torch.float32)
            fast = {dt: CpuInt4Linear(ref, dt)
                    for dt in (torch.bfloat16, torch.float32)}
            dense = torch.randn(k, n)
            row = dict(model=model, layer=label, k=k, n=n)
            for m in (1, 128):
                x = torch.randn(m, k)
                for dt, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
                    layer, xc = fast[dt], x.to(dt)
                    op = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(  # noqa: E731
                        xc, layer.int4_packed, GROUP, layer.int4_scales_zeros)
                    row[f"int4_{name}_m{m}_ms"] = median_time(op, device, reps if m == 1 else 2) * 1e3
                if m == 1:
                    row["dequant_m1_ms"] = median_time(lambda: ref(x), device, max(2, reps // 2)) * 1e3
                row[f"dense_m{m}_ms"] = median_time(lambda: x @ dense, device, reps if m == 1 else 2) * 1e3
            nbytes = fast[torch.bfloat16].int4_packed.numel() + fast[torch.bfloat16].int4_scales_zeros.nbytes
            row["int4_bf16_gbs"] = nbytes / (row["int4_bf16_m1_ms"] / 1e3) / 1e9
            rows.append(row)
            del ref, fast, dense
    return rows, bw


def bench_attention(models: list[str], device: torch.device, contexts=(128, 2048, 4096), reps: int = 20) -> list[dict]:
    """Decode attention (one new token over `ctx` cached ones, one layer): our split-K Triton
    kernel, which reads the valid length from a device tensor (what the CUDA graph needs), vs
    PyTorch SDPA over the same prefix, which needs the length on the host. Off CUDA our kernel
    runs through Triton's interpreter: that checks the harness, not speed."""
    import torch.nn.functional as F

    from edge_vlm.backends.triton.decode_attention import decode_attention

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = []
    for model in models:
        cfg = llm_config(model)
        h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        for ctx in contexts:
            gen = torch.Generator(device="cpu").manual_seed(ctx)
            q = torch.randn(h, d, generator=gen).to(device, dtype)
            k = torch.randn(hkv, max(contexts), d, generator=gen).to(device, dtype)
            v = torch.randn(hkv, max(contexts), d, generator=gen).to(device, dtype)
            length = torch.tensor([ctx], dtype=torch.int32, device=device)
            ours = median_time(lambda: decode_attention(q, k, v, length), device, reps)
            q4, k4, v4 = q[None, :, None], k[None, :, :ctx], v[None, :, :ctx]
            sdpa = median_time(lambda: F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=h != hkv), device, reps)
            nbytes = 2 * hkv * ctx * d * k.element_size()
            rows.append(dict(model=model, ctx=ctx, ours_us=ours * 1e6, sdpa_us=sdpa * 1e6, kv_mb=nbytes / 1e6,
                             ours_gbs=nbytes / ours / 1e9))
    return rows


def format_attention(rows: list[dict], device_name: str) -> str:
    lines = [f"Decode attention, one layer, batch 1; device: {device_name}.", "",
             "| model | context | KV read MB | ours µs | ours GB/s | SDPA µs | SDPA / ours |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['ctx']} | {r['kv_mb']:.1f} | {r['ours_us']:.1f} | {r['ours_gbs']:.0f} | "
                     f"{r['sdpa_us']:.1f} | {r['sdpa_us'] / r['ours_us']:.2f}x |")
    return "\n".join(lines)


def format_cuda(rows: list[dict], bw: float, device_name: str) -> str:
    lines = [f"Device: {device_name}; device-to-device copy: {bw / 1e9:.0f} GB/s (same run). Batch 1, group {GROUP}.", "",
             "| model | layer | K x N | ours int4 µs | ours GB/s | % of copy | fp16 matmul µs | tinygemm µs | vs fp16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tg = f"{r['tinygemm_us']:.1f}" if r["tinygemm_us"] else "n/a"
        lines.append(f"| {r['model']} | {r['layer']} | {r['k']}x{r['n']} | {r['ours_us']:.1f} | {r['ours_gbs']:.0f} | "
                     f"{r['pct_copy']:.0f}% | {r['fp16_us']:.1f} | {tg} | {r['fp16_us'] / r['ours_us']:.2f}x |")
    return "\n".join(lines)


def format_cpu(rows: list[dict], bw: float, device_name: str) -> str:
    lines = [f"Device: {device_name}; memory copy: {bw / 1e9:.1f} GB/s (same run). Group {GROUP}; times in ms.", "",
             "| model | layer | K x N | int4 bf16-act, 1 row | int4 fp32-act, 1 row | dequant+matmul, 1 row | "
             "fp32 dense, 1 row | int4 bf16-act, 128 rows | int4 fp32-act, 128 rows | fp32 dense, 128 rows | "
             "int4 bf16-act GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layer']} | {r['k']}x{r['n']} | {r['int4_bf16_m1_ms']:.2f} | "
                     f"{r['int4_fp32_m1_ms']:.2f} | {r['dequant_m1_ms']:.1f} | {r['dense_m1_ms']:.2f} | "
                     f"{r['int4_bf16_m128_ms']:.1f} | {r['int4_fp32_m128_ms']:.1f} | {r['dense_m128_ms']:.1f} | "
                     f"{r['int4_bf16_gbs']:.1f} |")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_vlm.benchmarks.bench_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", choices=sorted(LLM_SHAPES), help="model shapes (default: the three of the published "
                   "figures on CUDA, vila1.5-3b on CPU)")
    p.add_argument("--reps", type=int, default=5, help="repetitions per CPU timing (default 5)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        models = args.models or list(FIGURE_SHAPES)
        rows, bw = bench_cuda(models, device)
        print(format_cuda(rows, bw, device_name(device)))
        print()
        print(format_attention(bench_attention(models, device), device_name(device)))
    else:
        models = args.models or ["vila1.5-3b"]
        rows, bw = bench_cpu(models, args.reps)
        print(format_cpu(rows, bw, device_name(device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
