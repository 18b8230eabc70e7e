"""`edge-vlm export gguf|onnx`: a model's parts in the formats other runtimes run. The commands live
here, above the runtime they use (loading the model, then a backend's exporter), so no backend imports
the loader."""

from __future__ import annotations

import sys

import torch

from ..backends.llamacpp.gguf_export import OUTTYPES, export_gguf
from ..backends.onnx.export import PRECISIONS, export_parts, read_manifest
from ..backends.onnx.int8 import DEFAULT_METHOD, METHODS
from ..errors import EdgeVLMError
from ..formats.layout import detect_layout
from ..formats.vision_configs import vision_configs
from ..imaging.preprocess import load_image
from ..loading import load_for_export, load_vision


def register(sub) -> None:
    """`edge-vlm export gguf|onnx`: a model's parts in the formats other runtimes run."""
    p = sub.add_parser("export", help="write the LLM as GGUF (llama.cpp) or the vision tower as ONNX",
                       description="Export a model's language model to GGUF for llama.cpp, or its vision tower and "
                                   "projector to ONNX for ONNX Runtime (CPU, CUDA, TensorRT).")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    g = formats.add_parser("gguf", help="the language model as a GGUF file llama.cpp loads",
                           description="Write the LLM (Llama, Qwen2, Nemotron; text-only or a VLM's) as GGUF: "
                                       "AWQ checkpoints as Q4_1 blocks of the same integers and scales, 16-bit ones "
                                       "as F16/Q8_0 or through llama.cpp's quantizer (Q4_K_M, ...).")
    _gguf_arguments(g)
    g.set_defaults(func=run_gguf)
    o = formats.add_parser("onnx", help="the vision tower and projector as ONNX files",
                           description="Write the vision tower (to its selected layer) with its projector as ONNX "
                                       "files (fp32, fp16, int8) with a dynamic batch axis.")
    _onnx_arguments(o)
    o.set_defaults(func=run_onnx)



def _gguf_arguments(parser) -> None:
    """Arguments of `edge-vlm export gguf MODEL OUT.gguf`."""
    parser.add_argument("model", metavar="MODEL", help="model folder or Hugging Face repo id (its LLM is exported)")
    parser.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write (replaced if it exists)")
    parser.add_argument("--outtype", choices=OUTTYPES, default="auto", type=str.lower,
                        help="auto (default): q4_1-awq for AWQ checkpoints (their int4 weights as Q4_1 blocks, "
                             "no re-quantization), f16 otherwise; q4_k_m etc. use llama.cpp's quantizer")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_gguf(args) -> int:
    progress = False if args.no_progress else sys.stderr.isatty()
    out = export_gguf(load_for_export(args.model, progress), args.out, args.outtype, progress=progress)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _onnx_arguments(parser) -> None:
    parser.add_argument("model", help="model folder or Hugging Face repo id (VILA or LLaVA layout)")
    parser.add_argument("out_dir", metavar="DIR", help="folder the .onnx files are written into")
    parser.add_argument("--precision", action="append", choices=PRECISIONS, metavar="P",
                        help="fp32, fp16 (GPU) or int8 (CPU); repeat for several "
                             f"(default: all of {', '.join(PRECISIONS)})")
    parser.add_argument("--int8-method", choices=METHODS, default=DEFAULT_METHOD,
                        help=f"ONNX Runtime's dynamic or static (calibrated) quantization (default {DEFAULT_METHOD}: "
                             "it kept the features closer on both real-size towers)")
    parser.add_argument("--calibration-image", action="append", default=[], metavar="PATH",
                        help="an image for static calibration and the int8 feature check (repeat; default: synthetic)")


def run_onnx(args) -> int:
    try:
        import onnx  # noqa: F401 - both are needed below, deep inside the exporter and the quantizer
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise EdgeVLMError(f"exporting to ONNX needs {e.name}: pip install 'edge-vlm[onnx]'") from None
    layout = detect_layout(args.model)
    if not layout.multimodal:
        raise EdgeVLMError(f"{layout.folder} is a text-only model: it has no vision tower to export")
    show = sys.stderr.isatty()
    parts = load_vision(layout, vision_configs(layout), torch.float32, "cpu", show)
    calibration = None
    if args.calibration_image:
        calibration = [load_image(p) for p in args.calibration_image]
    written = export_parts(parts.tower, parts.projector, parts.image, args.out_dir, args.precision or PRECISIONS,
                           args.int8_method, calibration, progress=show)
    int8 = (read_manifest(args.out_dir) or {}).get("int8")
    for precision, path in written.items():
        note = f"  (feature cosine to fp32: {int8['cosine']:.4f}, {int8['method']})" if precision == "int8" else ""
        print(f"{precision}: {path}{note}")
    return 0
