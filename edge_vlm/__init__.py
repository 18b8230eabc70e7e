"""edge-vlm: a quantized runtime for vision-language models on Jetson Orin and RTX GPUs."""

from .errors import EdgeVLMError
from .generate import GenerationConfig, GenerationStats
from .loading import load_model
from .session import ChatSession
from .version import __version__

__all__ = ["load_model", "ChatSession", "GenerationConfig", "GenerationStats", "EdgeVLMError", "__version__"]
