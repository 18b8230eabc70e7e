"""`edge-vlm export onnx MODEL DIR`: the arguments and the run (the subcommand is mounted by edge_vlm.commands).

Only the vision tower and projector are loaded (fp32, on the CPU), never the LLM.
"""

from __future__ import annotations

import sys

from .export import PRECISIONS


def add_export_arguments(parser) -> None:
    from .int8 import DEFAULT_METHOD, METHODS

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


def run_export(args) -> int:
    import torch

    from ...errors import EdgeVLMError
    from ...loader import detect_layout, load_vision, vision_configs
    from .export import export_parts

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
        from ...imaging.preprocess import load_image

        calibration = [load_image(p) for p in args.calibration_image]
    written = export_parts(parts.tower, parts.projector, parts.image, args.out_dir, args.precision or PRECISIONS,
                           args.int8_method, calibration, progress=show)
    from .export import read_manifest

    int8 = (read_manifest(args.out_dir) or {}).get("int8")
    for precision, path in written.items():
        note = f"  (feature cosine to fp32: {int8['cosine']:.4f}, {int8['method']})" if precision == "int8" else ""
        print(f"{precision}: {path}{note}")
    return 0
