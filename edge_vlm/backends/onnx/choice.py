"""Whether the vision tower runs on ONNX Runtime or in torch, and attaching the chosen encoder.

`with_onnx_vision(model, mode)`:
- "torch": the torch tower as loaded.
- "onnx": the ONNX graph on the best provider present (providers.py); the export happens on first use.
- "auto": "onnx" on the CPU where ONNX Runtime's int8 matmul is measured faster than the torch
  tower's own matmul at the tower's shapes (`cpu_int8_speedup`, timed once per process like the bf16
  choice in backends/cpu/timing.py), else "torch". GPUs stay on torch in "auto": TensorRT's first
  start builds an engine for minutes, which only an explicit "onnx" should cost.
Whatever goes wrong on the way (onnxruntime missing, the export failing, a corrupt file, a provider
that raises at session start) leaves the torch tower in place with one warning line.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .cache import ensure_exported, export_dir, graph_image_config, tower_only
from .encoder import OnnxVisionEncoder
from .int8 import MIN_COSINE, quiet_quantizer
from .providers import plan as provider_plan

MODES = ("auto", "onnx", "torch")
# "auto" switches the CPU to ONNX Runtime at this measured int8 matmul speed-up or more: the CPUs with int8
# dot-product units (VNNI, AMX; typically 2-4x). On the AVX2 Zen 1 machine the probe reads 1.13-1.14x and
# the whole tower gains 1.27-1.30x (benchmarks/vision_backends.py, RESULTS.md): not worth a first start
# that exports for 2-3 minutes, and too close to the probe's run-to-run spread (~10%) to decide stably.
# `vision_backend="onnx"` takes that 1.3x anyway.
AUTO_MIN_SPEEDUP = 1.3


class OnnxFallbackWarning(RuntimeWarning):
    """The ONNX vision path could not be used; the torch tower runs instead."""


class OnnxInt8RefusedWarning(RuntimeWarning):
    """The int8 file's features moved too far from fp32 (cosine below int8.MIN_COSINE): the fp32 file runs."""


def _fallback(reason: str) -> str:
    warnings.warn(f"ONNX vision tower unavailable ({reason}); using the torch tower", OnnxFallbackWarning,
                  stacklevel=3)
    return "torch"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def _min_time(fn, reps: int = 3) -> float:
    fn()  # warm-up: allocations, weight pre-packing
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def cpu_int8_speedup(tokens: int, width: int, inner: int, torch_dtype: torch.dtype = torch.float32) -> float:
    """How many times faster ONNX Runtime's int8 (dynamic) matmul runs the tower's MLP matmul than torch does
    in `torch_dtype`, on this CPU with torch's thread count; timed once per process (~1 s at real sizes).

    The MLP and attention projections are >90% of a ViT's time, so this ratio tracks the whole tower's; it
    reads low, since ONNX Runtime is also faster than torch outside the matmuls (Zen 1: probe 1.13x, tower
    1.28x). int8 pays off with VNNI / AMX; without them (AMD Zen 1's 128-bit units) it is barely faster
    than fp32.
    """
    # optional: onnx (the onnx extra)
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(tokens, width, generator=gen), torch.randn(width, inner, generator=gen) * width ** -0.5
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, inner])],
                              [numpy_helper.from_array(w.numpy(), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "probe.onnx", Path(tmp) / "probe-int8.onnx"
        onnx.save(model, fp32)

        with quiet_quantizer():
            quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(int8), opts, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy().astype(np.float32)}
    xt, wt = x.to(torch_dtype), w.to(torch_dtype)
    with torch.inference_mode():
        t_torch = _min_time(lambda: torch.matmul(xt, wt))
    t_ort = _min_time(lambda: session.run(None, feed))
    return t_torch / t_ort


def _param_dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


def _auto_prefers_onnx(model) -> bool:
    cfg = model.vision.cfg
    return cpu_int8_speedup(model.vision.num_tokens, cfg.hidden_size, cfg.intermediate_size,
                            _param_dtype(model.vision)) >= AUTO_MIN_SPEEDUP


def with_onnx_vision(model, mode: str = "auto", precision: str | None = None, progress: bool = False):
    """`model` (a loaded VisionLanguageModel) with its vision path chosen: a new model object whose
    `encoder` is ONNX Runtime's (None on the torch path) and whose `info.vision_backend` says what runs
    the tower, e.g. "torch" or "onnxruntime CPU int8". `precision` forces the file (fp32 / fp16 / int8)
    instead of the provider's own choice."""
    encoder, described = choose_onnx_vision(model, mode, precision, progress)
    return model.replace(encoder=encoder, info=dataclasses.replace(model.info, vision_backend=described))


def choose_onnx_vision(model, mode: str = "auto", precision: str | None = None,
                       progress: bool = False) -> tuple[OnnxVisionEncoder | None, str]:
    """The encoder ONNX Runtime gives `model`'s tower and projector (None: the torch path), and what
    runs the tower in words. Falls back to torch with one warning where ONNX was asked and fails."""
    if mode not in MODES:
        raise ValueError(f"vision backend must be one of {', '.join(MODES)}, not {mode!r}")
    device = model.device
    if mode == "torch" or not model.is_multimodal or device.type == "meta":
        return None, "torch"
    try:
        # optional: onnxruntime (the onnx extra)
        import onnxruntime as ort
    except ImportError:
        if mode == "auto":
            return None, "torch"  # nothing asked for ONNX: no warning for an extra that was never installed
        return None, _fallback("onnxruntime is not installed: pip install 'edge-vlm[onnx]' (or [onnx-gpu])")
    if mode == "auto":
        try:
            if device.type != "cpu" or not _auto_prefers_onnx(model):
                return None, "torch"
        except Exception as e:  # noqa: BLE001 - a probe that fails leaves the path that works
            return None, _fallback(f"timing ONNX Runtime failed: {_one_line(e)}")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # engines beside the export they were built from: new weights, new export, new engines
    plan = provider_plan(device, ort.get_available_providers(), export_dir(model), model.vision.cfg.image_size,
                         precision or "int8", name, ort.__version__)
    if plan is None:
        return None, _fallback(f"onnxruntime has no execution provider for {device.type} "
                         f"(available: {', '.join(ort.get_available_providers())}; pip install onnxruntime-gpu)")
    if precision:
        plan.precision = precision
    try:
        path, manifest = ensure_exported(model, plan.precision, progress)
    except Exception as e:  # noqa: BLE001 - exporter, checker or quantizer: the torch tower still works
        return None, _fallback(f"export failed: {_one_line(e)}")
    if plan.precision == "int8" and precision is None and manifest["int8"]["cosine"] < MIN_COSINE:
        plan.precision = "fp32"  # int8 moved these features too far: the fp32 file, still ONNX Runtime's speed
        path = path.with_name(path.name.replace("int8", "fp32"))
        note = f"int8 refused: cosine {manifest['int8']['cosine']:.4f} < bound {MIN_COSINE}"
        warnings.warn(f"ONNX vision: the int8 tower's features have cosine {manifest['int8']['cosine']:.4f} to fp32, "
                      f"below the bound {MIN_COSINE}; running the fp32 file", OnnxInt8RefusedWarning, stacklevel=2)
    else:
        note = ""

    try:
        encoder = OnnxVisionEncoder.open(path, graph_image_config(model), plan, device, model.dtype, note,
                                         tower_only=tower_only(model))
        if device.type != "cpu":  # GPU providers may fail only at the first run (engine build, kernels)
            encoder.encode_pixels(torch.zeros(1, 3, model.vision.cfg.image_size, model.vision.cfg.image_size))
    except Exception as e:  # noqa: BLE001 - a corrupt file or a provider that fails to start
        return None, _fallback(f"{plan.provider} failed to start on {path}: {_one_line(e)}; delete {path.parent} "
                         "to export again")
    return encoder, encoder.describe()


def release_torch_tower(model) -> int:
    """Free the torch tower's and projector's weights once ONNX Runtime encodes the images (`model.encoder`
    set); returns the bytes freed. At VILA1.5's SigLIP-so400m that is ~1.6 GB in fp32, about as much as the
    rest of a 3B int4 model: keeping both would double the vision side's memory for nothing. The modules
    stay, on the meta device, for their shapes and configs; attaching "torch" again needs a fresh load.
    """
    if model.encoder is None or model.vision is None:
        return 0
    # S2 models keep the projector: it runs in torch after the scales are merged
    parts = [m for m in (model.vision, None if tower_only(model) else model.projector) if m is not None]
    freed = sum(t.numel() * t.element_size() for m in parts for t in (*m.parameters(), *m.buffers())
                if t.device.type != "meta")
    for m in parts:
        m.to("meta")
    return freed

