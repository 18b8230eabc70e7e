"""The GGUF a model's language model runs from in llama.cpp: exported once, then reused.

The file lives in edge-vlm's cache folder (`$EDGE_VLM_CACHE`, default ~/.cache/edge-vlm), under
a key made from the checkpoint's location and the names, sizes and modification times of its
LLM files, so an edited or replaced checkpoint is exported again and an unchanged one never is.
AWQ checkpoints become Q4_1 blocks of the same integers and scales (no second quantization);
16-bit ones Q8_0 (within rounding of 16-bit quality, half the bytes, fast on CPUs).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from ...cache import cache_root
from .gguf_export import export_gguf

FORMAT_VERSION = 1  # bump when the export changes what it writes


def _key(layout) -> str:
    h = hashlib.sha256(f"v{FORMAT_VERSION}:{Path(layout.folder).resolve()}".encode())
    for path in sorted(Path(layout.llm_dir).iterdir()):
        if path.is_file():
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:24]


def cached_gguf(layout, awq: bool, load, progress: bool = False) -> Path:
    """The GGUF of `layout`'s language model (AWQ weights or not), exporting it first if this
    checkpoint has none yet; `load()` gives the model to export (only called then)."""
    outtype = "q4_1-awq" if awq else "q8_0"
    path = cache_root() / "gguf" / _key(layout) / f"{Path(layout.folder).name}-{outtype}.gguf"
    if not path.is_file():
        print(f"edge-vlm: exporting the language model for llama.cpp once ({outtype}): {path}", file=sys.stderr)
        export_gguf(load(), path, outtype, progress=progress)  # temporary name, renamed when complete
    return path
