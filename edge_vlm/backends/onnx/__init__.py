"""The vision tower and projector on ONNX Runtime: CPU (int8), CUDA (fp16) and TensorRT (fp16 engine).

- export.py: tower (up to its selected layer) + projector -> ONNX through torch's exporter, fp32 / fp16,
  dynamic batch, checked by onnx's checker, written under temporary names and renamed into place;
- int8.py: the CPU's int8 file, by ONNX Runtime's quantizer (dynamic or static), with its feature check;
- providers.py: TensorRT, then CUDA, then CPU, with each one's file and options;
- encoder.py: `OnnxVisionEncoder`, the session behind `VisionLanguageModel.encode_images`'s contract;
- cache.py: where a model's export lives, and exporting it once, on first use;
- choice.py: `with_onnx_vision(model, mode)`: the choice, and the fallback to torch with one warning.
`edge-vlm export onnx MODEL DIR` is a command of the CLI layer (edge_vlm/cli/export.py).
onnxruntime and onnx are optional (`pip install 'edge-vlm[onnx]'`): importing this package needs neither.
"""

from .choice import (MODES, OnnxFallbackWarning, OnnxInt8RefusedWarning, choose_onnx_vision, cpu_int8_speedup,
                     release_torch_tower, with_onnx_vision)
from .encoder import OnnxVisionEncoder
from .export import PRECISIONS, export_vision

__all__ = ["MODES", "PRECISIONS", "OnnxFallbackWarning", "OnnxVisionEncoder", "choose_onnx_vision", "with_onnx_vision",
           "OnnxInt8RefusedWarning", "cpu_int8_speedup", "export_vision", "release_torch_tower"]
