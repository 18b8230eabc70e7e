"""The real SmolLM2-135M test model: built by `edge_vlm.benchmarks.real_model` (conftest's import)."""

from edge_vlm.benchmarks.real_model import gguf_path, smollm2_folder

__all__ = ["gguf_path", "smollm2_folder"]
