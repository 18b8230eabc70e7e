"""Timing helpers shared by the benchmarks: one synchronised call, median wall time, copy bandwidth
and the share of it a measured step reaches."""

from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds per call. On CUDA the calls are replayed from a CUDA graph when possible
    (so Python launch overhead is not counted for microsecond kernels), else timed with sync."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench_cudagraph

            return do_bench_cudagraph(fn, rep=max(20, reps), return_mode="median") / 1e3
        except Exception:  # not capturable: fall back to synchronised wall time
            pass
    return statistics.median(wall_time(fn, device) for _ in range(reps))


def wall_time(fn, device: torch.device) -> float:
    """Seconds of one call, the device synchronised before and after: earlier queued work is not counted, its own is."""
    device = torch.device(device)
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def copy_bandwidth(device: torch.device, mib: int | None = None) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), measured now, on this device."""
    device = torch.device(device)
    mib = mib or (1024 if device.type == "cuda" else 256)
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, reps=10 if device.type == "cuda" else 5)
    return 2 * src.numel() * 4 / t


def bandwidth_share(nbytes: int, seconds: float, bandwidth: float) -> float:
    """Reading `nbytes` in `seconds` as a fraction of `bandwidth` (1.0: the memory floor, at copy speed)."""
    return nbytes / seconds / bandwidth
