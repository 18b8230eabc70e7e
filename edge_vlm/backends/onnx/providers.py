"""Which ONNX Runtime execution provider runs the vision graph, with which file and options.

Best present first: TensorRT (the fp32 file, built into an fp16 engine by TensorRT itself, which
keeps in fp32 what would overflow in fp16; engines and timing cache in the model's cache folder,
so only the first start pays the build), then CUDA (the fp16 file), then the CPU (int8 or fp32,
chosen by the caller). A GPU provider is only used when the model itself is on that GPU: features
computed on one device and fed to an LLM on another would cost a copy and a second runtime's memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
SHORT_NAMES = {TRT: "TensorRT", CUDA: "CUDA", CPU: "CPU"}
TRT_MAX_BATCH = 16  # the engine's profile covers 1..16 images; the encoder runs larger batches in chunks


@dataclass
class ProviderPlan:
    """What to open: `providers` as InferenceSession takes them (name, options), and the file's precision."""

    providers: list[tuple[str, dict]]
    precision: str  # "fp32", "fp16" or "int8"
    max_batch: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def provider(self) -> str:
        return self.providers[0][0]


def trt_cache_dir(cache: Path, device_name: str, ort_version: str) -> Path:
    """Engines are specific to the GPU and the ONNX Runtime / TensorRT build: one folder per GPU and ORT version."""
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", f"{device_name}-ort{ort_version}").strip("-")
    return Path(cache) / "tensorrt" / tag


def plan(device: torch.device, available: list[str], cache: Path, image_size: int, cpu_precision: str = "fp32",
         device_name: str = "gpu", ort_version: str = "") -> ProviderPlan | None:
    """The provider plan for a model on `device`, given ONNX Runtime's available providers; None: none fits.

    On CUDA without a GPU provider the answer is None (onnxruntime, not onnxruntime-gpu, is installed).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return ProviderPlan([(CPU, {})], cpu_precision)
    if device.type != "cuda":
        return None
    gpu = {"device_id": device.index or 0}
    if TRT in available:
        engines = trt_cache_dir(cache, device_name, ort_version)
        shape = lambda n: f"pixels:{n}x3x{image_size}x{image_size}"  # noqa: E731
        trt = {**gpu, "trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(engines),
               "trt_timing_cache_enable": True, "trt_timing_cache_path": str(engines),
               "trt_profile_min_shapes": shape(1), "trt_profile_opt_shapes": shape(1),
               "trt_profile_max_shapes": shape(TRT_MAX_BATCH)}
        # nodes TensorRT does not take run on CUDA, not on the CPU
        return ProviderPlan([(TRT, trt), (CUDA, gpu), (CPU, {})], "fp32", TRT_MAX_BATCH)
    if CUDA in available:
        return ProviderPlan([(CUDA, gpu), (CPU, {})], "fp16")
    return None
