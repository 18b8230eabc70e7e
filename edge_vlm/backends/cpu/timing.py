"""Whether this CPU runs bfloat16 faster than float32: timed once per process, overridable.

Both CPU choices (the int4 matmul's activation dtype, the vision tower's dtype) hinge on the
same hardware question (AVX512-BF16 / AMX or not), and a guess from CPU flags would be wrong
on some machines, hence a measurement of a few milliseconds, cached for the process.
"""

from __future__ import annotations

import functools
import os
import time

import torch


def _fastest(runs: dict) -> object:
    """The key of `runs` (key -> zero-argument callable) whose call took least, after a warm-up."""
    best, best_time = None, float("inf")
    for key, run in runs.items():
        run()  # warm-up
        start = time.perf_counter()
        for _ in range(3):
            run()
        elapsed = time.perf_counter() - start
        if elapsed < best_time:
            best, best_time = key, elapsed
    return best


def _bf16_forced() -> bool | None:
    """EDGE_VLM_CPU_BF16=1 / 0 forces the CPU bf16 choices below on / off (reproducible runs, or
    a machine too busy to time fairly); unset, they are measured."""
    value = os.environ.get("EDGE_VLM_CPU_BF16", "").strip().lower()
    return None if not value else value not in ("0", "false", "no", "off")


@functools.cache
def cpu_int4_compute_dtype() -> torch.dtype:
    """The activation dtype torch's int4 CPU matmul runs fastest with on this CPU, timed once.

    With bfloat16 activations it uses the AVX512-BF16 / AMX paths where the CPU has them and
    measured ~30x faster than with float32 (RESULTS.md); on CPUs without them bfloat16 can be
    the slower one, hence a measurement (two ~1 MB matmuls, a few ms) rather than a guess.
    """
    if _bf16_forced() is not None:
        return torch.bfloat16 if _bf16_forced() else torch.float32
    k, n, group = 1024, 1024, 128
    gen = torch.Generator().manual_seed(0)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen), 1)
    x, sz = torch.randn(1, k, generator=gen), torch.rand(k // group, n, 2, generator=gen)
    return _fastest({dtype: functools.partial(torch.ops.aten._weight_int4pack_mm_for_cpu, x.to(dtype), packed, group,
                                              sz.to(dtype)) for dtype in (torch.float32, torch.bfloat16)})


@functools.cache
def cpu_bf16_matmul_is_faster() -> bool:
    """Whether dense bfloat16 matmuls beat float32 ones on this CPU (AVX512-BF16 / AMX), timed once.

    Decides whether the vision tower runs in bfloat16 on CPU: measured 2.4x faster on its
    shapes here (RESULTS.md); on CPUs without those instructions bfloat16 is emulated and slower.
    """
    if _bf16_forced() is not None:
        return _bf16_forced()
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=gen), torch.randn(512, 1024, generator=gen)
    return _fastest({dtype: functools.partial(torch.matmul, a.to(dtype), b.to(dtype))
                     for dtype in (torch.float32, torch.bfloat16)}) == torch.bfloat16
