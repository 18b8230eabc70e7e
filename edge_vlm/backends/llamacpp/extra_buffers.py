"""Whether llama.cpp's extra CPU buffer types survive on this machine, asked once in a child process.

llama.cpp moves weights into "extra" CPU buffer types when it loads a model: AMX tiles on Intel
Xeons that have AMX, interleaved (repacked) blocks for AVX2 / AVX512 / NEON. On some machines the
AMX matmul segfaults inside ggml (seen here: a 2-core Xeon VM with AMX in its CPU flags, on every
prompt of more than one token), and a segfault takes the user's chat, server or camera run with it.
So the first time a GGUF's weight types are used on a machine (CPU flags, llama-cpp-python version),
a child process loads it with the extra buffers on and decodes one batch; a child that crashes,
hangs or fails turns them off (`use_extra_bufts = False`: llama.cpp's plain CPU kernels) with one
warning line. The verdict is a small JSON file in the cache folder; later loads read it and start
no child. GPU offload never asks (the weights live on the GPU).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from .gguf_cache import cache_root

PROBE_TIMEOUT_S = 180
# The child: load with the extra buffer types on (llama.cpp's default) and decode one batch of 32
# tokens, the path that crashed (prompt batches run the repacked / AMX matmuls). Only llama_cpp is
# imported, so the child starts in well under a second plus the model's load.
_CHILD = """
import sys
import llama_cpp as lib
lib.llama_backend_init()
mp = lib.llama_model_default_params()
mp.use_extra_bufts = True
model = lib.llama_model_load_from_file(sys.argv[1].encode(), mp)
if not model:
    sys.exit(3)  # _NOT_LOADED
cp = lib.llama_context_default_params()
cp.n_ctx = cp.n_batch = cp.n_ubatch = 64
cp.n_threads = cp.n_threads_batch = 2
ctx = lib.llama_init_from_model(model, cp)
n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
ids = (lib.llama_token * 32)(*[i % n_vocab for i in range(32)])
sys.exit(0 if lib.llama_decode(ctx, lib.llama_batch_get_one(ids, 32)) == 0 else 4)
"""


class LlamaCppCpuWarning(RuntimeWarning):
    """llama.cpp's extra CPU buffer types failed the first-run check and are off."""


def verdict_key(gguf_path: Path) -> dict:
    """What the verdict depends on: the machine's CPU, llama-cpp-python, the GGUF's weight types."""
    import llama_cpp  # optional dependency: only reached on the llama.cpp backend

    return {"machine": platform.machine(), "cpu_flags": _cpu_flags(), "llama_cpp": llama_cpp.__version__,
            "weight_types": _weight_types(gguf_path)}


def _cpu_flags() -> list[str]:
    """The SIMD / matrix flags ggml chooses kernels by (Linux; elsewhere the processor's name)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return [platform.processor()]
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "sve", "f16c",
                                                                                    "fma", "asimd", "i8mm")))
    return []


def _weight_types(gguf_path: Path) -> list[str]:
    from gguf import GGUFReader  # optional dependency: the [llamacpp] extra installs it

    try:
        return sorted({t.tensor_type.name for t in GGUFReader(str(gguf_path)).tensors})
    except (ValueError, OSError) as e:  # not a GGUF the gguf package reads: llama.cpp's load says more
        return [f"unreadable: {type(e).__name__}"]


def verdict_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root() / "verdicts" / f"llamacpp-extra-buffers-{digest}.json"


def read_verdict(key: dict) -> dict | None:
    """The stored verdict for `key`; None when there is none, or it is unreadable or for another key."""
    try:
        data = json.loads(verdict_path(key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("extra_buffers"), bool):
        return None
    return data


def write_verdict(key: dict, verdict: dict) -> None:
    """Written to a temporary name and renamed, so two processes checking at once never leave half a file."""
    path = verdict_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"key": key, **verdict}, f, indent=1)
    os.replace(tmp, path)


_NOT_LOADED = 3  # the child's exit code when llama.cpp cannot load the file at all


def probe(gguf_path: Path, child: list[str] | None = None, timeout: float = PROBE_TIMEOUT_S) -> dict | None:
    """Run the child check: {"extra_buffers": bool, "reason": str}, or None when the file does not
    load at all (no verdict: the parent's own load reports why). `child` replaces the command (tests)."""
    cmd = child or [sys.executable, "-c", _CHILD, str(gguf_path)]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"extra_buffers": False, "reason": f"a test decode did not finish in {timeout:.0f} s"}
    if done.returncode == 0:
        return {"extra_buffers": True, "reason": "a test decode with them passed"}
    if done.returncode == _NOT_LOADED:
        return None
    how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
    return {"extra_buffers": False, "reason": f"a test decode with them crashed ({how})"}


def extra_buffers_safe(gguf_path: str | Path, child: list[str] | None = None) -> bool:
    """Whether to load `gguf_path` with llama.cpp's extra CPU buffer types (read from the cached
    verdict, else asked of a child process once and stored)."""
    key = verdict_key(Path(gguf_path))
    verdict = read_verdict(key)
    if verdict is None:
        verdict = probe(Path(gguf_path), child)
        if verdict is None:
            return True  # llama.cpp cannot load the file: its own error follows
        write_verdict(key, verdict)
    if not verdict["extra_buffers"]:
        warnings.warn(f"llama.cpp's repacked CPU weights (AMX / interleaved blocks) are off on this machine: "
                      f"{verdict['reason']}; using its plain CPU kernels", LlamaCppCpuWarning, stacklevel=3)
    return verdict["extra_buffers"]
