"""Which precision the quantizer's bulk products run in on this machine: chosen by measuring.

bfloat16 products (float32 accumulation) run about 4-5x the float32 rate on CPUs with AMX and
about 2x with AVX512-BF16 alone, but slower than float32 where bf16 is emulated (AVX2-only CPUs).
The flags do not tell the rate, so `auto` times one product of the layer's width in each
precision (a fraction of a second) and takes bf16 only where it is at least `BF16_MIN_SPEEDUP`
times faster. On CUDA the layer already runs in fp16 and the searches stay in float32.
The measured rates also feed the time estimate (quantize/cost.py).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

CHOICES = ("auto", "fp32", "bf16")
BF16_MIN_SPEEDUP = 1.5
CPU_SECONDS_PER_OP = 20e-6  # one small tensor op from Python (dispatch + a vector of a few thousand floats)
# the share of the probe's rate a layer's steps reach (a VILA1.5-3B layer, 2-core AVX512-BF16 machine:
# products of other shapes, bf16 conversions, Cholesky vs GEMM); benchmarks/real_size.py `layer` prints
# the shares each step reached, to retune these
REACHED = {"fp32": 0.8, "bf16": 0.5, "fp64": 0.6, "elements": 0.5}


@dataclass(frozen=True)
class MatmulRates:
    """Rates measured on this device now: GFLOP/s of a [rows, K] x [K, K] product per precision, and
    G element-passes/s of the elementwise chain fake quantization runs."""

    fp32: float
    bf16: float
    fp64: float = 0.0
    elementwise: float = 0.0

    def per_second(self, matmul: str) -> dict[str, float]:
        """Rates by quantize/cost.py step kind, per second, with the bulk products in `matmul` (on a CPU,
        whose layer runs in float32: the forwards and the searches alike)."""
        bulk = 1e9 * (self.bf16 * REACHED["bf16"] if matmul == "bf16" else self.fp32 * REACHED["fp32"])
        return {"forward": bulk, "search": bulk, "fp32": 1e9 * self.fp32 * REACHED["fp32"],
                "fp64": 1e9 * self.fp64 * REACHED["fp64"], "elements": 1e9 * self.elementwise * REACHED["elements"],
                "ops": 1 / CPU_SECONDS_PER_OP}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up (first-call allocations, kernel selection)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return max(best, 1e-9)


def _gflops(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / _best_time(lambda: a @ b, a.device, reps) / 1e9


def measure_rates(width: int, device, reps: int = 3) -> MatmulRates:
    """The rates at the layer's width (bounded to 512..4096, so tiny test models still time a real product),
    measured once per process and width: every run of a process then makes the same `auto` choice."""
    return _measured(min(4096, max(512, width)), str(torch.device(device)), reps)


@functools.lru_cache(maxsize=None)
def _measured(k: int, device: str, reps: int) -> MatmulRates:
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(2048, k, device=device, generator=gen)
    b = torch.randn(k, k, device=device, generator=gen)
    w = torch.randn(1 << 22, device=device, generator=gen)
    s = torch.rand(1 << 22, device=device, generator=gen) + 0.5
    chain = _best_time(lambda: torch.div(w, s).round_().add_(3).clamp_(0, 15), device, reps)
    return MatmulRates(_gflops(a, b, reps), _gflops(a.bfloat16(), b.bfloat16(), reps),
                       _gflops(a[:512].double(), b.double(), reps), 4 * w.numel() / chain / 1e9)


def choose_matmul(requested: str, device, width: int, rates: MatmulRates | None = None) -> tuple[str, MatmulRates]:
    """("fp32" or "bf16", the measured rates) for `requested` in CHOICES."""
    if requested not in CHOICES:
        raise ValueError(f"unknown matmul precision {requested!r}; use {', '.join(CHOICES)}")
    device = torch.device(device)
    rates = rates or measure_rates(width, device)
    if requested != "auto":
        return requested, rates
    if device.type != "cpu":
        return "fp32", rates
    return ("bf16" if rates.bf16 >= BF16_MIN_SPEEDUP * rates.fp32 else "fp32"), rates
