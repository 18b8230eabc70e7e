"""edge-vlm: a quantized runtime for vision-language models on Jetson Orin, RTX GPUs and CPUs.

The public names tools and users build on; the layers beneath are drawn in docs/ARCHITECTURE.md.
"""

from .errors import EdgeVLMError
from .generate import GenerationStats
from .loading import load_model
from .session import ChatSession
from .text.sampling import GenerationConfig
from .version import __version__

__all__ = ["load_model", "ChatSession", "GenerationConfig", "GenerationStats", "EdgeVLMError", "__version__"]
