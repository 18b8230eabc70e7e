"""The int8 file for the CPU, made by ONNX Runtime's own quantizer from the fp32 export.

Two ways, both ONNX Runtime's: "dynamic" (weights int8 per tensor, activations quantized at run
time from each tensor's own range) and "static" (activation ranges fixed from calibration images,
QDQ format). Only MatMuls are quantized: they are >90% of a ViT's work, and LayerNorm, softmax and
GELU stay fp32. The winner on feature cosine to fp32 (benchmarks/vision_backends.py, both real-size
towers) is the default. Every int8 file's cosine to fp32 is measured on held-out images when it is
made and written to the manifest; the runtime uses the file only at MIN_COSINE or above.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

METHODS = ("dynamic", "static")
DEFAULT_METHOD = "dynamic"
MIN_COSINE = 0.99


def synthetic_images(n: int, seed: int) -> list[Image.Image]:
    """Smooth colour fields with a few shapes: image-like statistics (edges, flat areas) without shipping photos."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = int(rng.integers(200, 480)), int(rng.integers(200, 480))
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(coarse, "RGB").resize((w, h), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            box = [x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))]
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        noisy = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
        out.append(Image.fromarray(noisy.clip(0, 255).astype(np.uint8), "RGB"))
    return out


def calibration_pixels(image_cfg, images=None, n: int = 4) -> np.ndarray:
    """Preprocessed calibration images (the model's own preprocessing), synthetic unless `images` are given."""
    from ...imaging.preprocess import preprocess

    return preprocess(list(images) if images else synthetic_images(n, seed=0), image_cfg).numpy()


def check_pixels(image_cfg) -> np.ndarray:
    """Two synthetic images the static quantizer never calibrates on: where the int8 file is judged."""
    from ...imaging.preprocess import preprocess

    return preprocess(synthetic_images(2, seed=1), image_cfg).numpy()


@contextlib.contextmanager
def quiet_quantizer():
    """The quantizer logs a pre-processing tip on the root logger for every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def activation_matmuls(path: Path) -> list[str]:
    """MatMuls of two activations (attention's scores and mix): dynamic quantization leaves them fp32, and
    so does static, or the two would not be compared on the same work (and calibrating them would hold
    every image's attention maps in memory)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and not any(i in weights for i in n.input)]


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol: one image per call, then None."""

    def __init__(self, pixels: np.ndarray):
        self.items = iter([{"pixels": p[None]} for p in pixels])

    def get_next(self):
        return next(self.items, None)

    def rewind(self):  # noqa: D401 - part of the protocol; one pass is all the calibrator makes
        pass


def quantize(fp32: Path, out: Path, calibration: np.ndarray, check: np.ndarray, method: str | None = None) -> dict:
    """fp32 ONNX file -> int8 file at `out`; returns {"method", "cosine"}: the cosine to fp32 on `check`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise ValueError(f"int8 method must be one of {', '.join(METHODS)}, not {method!r}")
    with quiet_quantizer():
        if method == "dynamic":
            quantize_dynamic(fp32, out, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                             use_external_data_format=True)
        else:
            quantize_static(fp32, out, _Reader(calibration), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul"], per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                            nodes_to_exclude=activation_matmuls(fp32))
    return {"method": method, "cosine": feature_cosine(fp32, out, check)}


def feature_cosine(reference: Path, candidate: Path, pixels: np.ndarray) -> float:
    """The smallest per-image cosine between the two files' features on `pixels` (CPU sessions)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = torch.get_num_threads()
    a, b = (ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels})[0]
            for p in (reference, candidate))
    return cosine(a, b)


def cosine(a, b) -> float:
    """Smallest per-image cosine similarity of two feature batches [N, ...] (numpy or torch)."""
    a, b = (np.asarray(x, dtype=np.float64).reshape(len(x), -1) for x in (a, b))
    return float(np.min((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
