"""edge-vlm's cache folder: `$EDGE_VLM_CACHE`, else ~/.cache/edge-vlm. GGUF exports, first-run verdicts and
(when the model folder is not writable) ONNX exports live under it; one definition for all of them."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("EDGE_VLM_CACHE") or Path.home() / ".cache" / "edge-vlm").expanduser()
