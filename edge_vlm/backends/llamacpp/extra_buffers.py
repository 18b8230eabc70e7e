"""Whether llama.cpp's extra CPU buffer types survive on this machine, asked once in a child process.

llama.cpp moves weights into "extra" CPU buffer types when it loads a model: AMX tiles on Intel
Xeons that have AMX, interleaved (repacked) blocks for AVX2 / AVX512 / NEON. On some machines the
AMX matmul segfaults inside ggml (seen here: a 2-core Xeon VM with AMX in its CPU flags, on every
prompt of more than one token), and a segfault takes the user's chat, server or camera run with it.
So the first time a GGUF's weight types are used on a machine (CPU flags, llama-cpp-python version),
a child process loads it with the extra buffers on and decodes one batch; a child that crashes,
hangs or fails turns them off (`use_extra_bufts = False`: llama.cpp's plain CPU kernels) with one
warning line. The verdict is kept beside the GPU first-run verdicts (backends/verdicts.py); later
loads read it and start no child; `edge-vlm doctor` lists it and `--recheck` discards it. GPU offload never asks (the weights live on the GPU).
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

from .. import verdicts
from ..verdicts import OpResult

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


OP = "llama.cpp extra CPU buffers"


def verdict_key(gguf_path: Path) -> dict:
    """What the verdict depends on: the machine's CPU, the installed versions (llama-cpp-python's
    among them), the GGUF's weight types. Kept with the GPU verdicts (backends/verdicts.py), so
    `edge-vlm doctor` lists it and `--recheck` discards it."""
    flags = _cpu_flags()
    types = _weight_types(gguf_path)
    level = next((name for name, prefix in (("AMX", "amx"), ("AVX512", "avx512"), ("AVX2", "avx2"), ("NEON", "asimd"))
                  if any(f.startswith(prefix) for f in flags)), "baseline")
    return {"device": {"type": "cpu", "name": f"llama.cpp on {platform.machine()}", "capability": level},
            "versions": verdicts.versions("cpu"),
            "family": {"backend": "llama.cpp", "cpu_flags": flags, "weight_types": types,
                       "summary": f"llama.cpp CPU kernels for {'/'.join(types)} weights"}}


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


_NOT_LOADED = 3  # the child's exit code when llama.cpp cannot load the file at all


def probe(gguf_path: Path, child: list[str] | None = None, timeout: float = PROBE_TIMEOUT_S) -> OpResult | None:
    """Run the child check; None when the file does not load at all (no verdict: the parent's own
    load reports why). `child` replaces the command (tests)."""
    cmd = child or [sys.executable, "-c", _CHILD, str(gguf_path)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return OpResult(False, f"a test decode did not finish in {timeout:.0f} s", time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    if done.returncode == 0:
        return OpResult(True, "a test decode with them passed", seconds)
    if done.returncode == _NOT_LOADED:
        return None
    how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
    return OpResult(False, f"a test decode with them crashed ({how})", seconds)


def extra_buffers_safe(gguf_path: str | Path, child: list[str] | None = None) -> bool:
    """Whether to load `gguf_path` with llama.cpp's extra CPU buffer types (read from the kept
    verdict, else asked of a child process once and kept)."""
    key = verdict_key(Path(gguf_path))
    path = verdicts.path_for(key)
    verdict = verdicts.read(path, key)
    if verdict is None:
        result = probe(Path(gguf_path), child)
        if result is None:
            return True  # llama.cpp cannot load the file: its own error follows
        verdict = verdicts.Verdict(key, {OP: result}, children=1, seconds=result.seconds,
                                   checked_at=time.strftime("%Y-%m-%d %H:%M:%S"))
        try:
            verdicts.write(path, verdict)
        except OSError:  # a read-only cache folder: the check runs again next time
            pass
    result = verdict.ops[OP]
    if not result.passed:
        warnings.warn(f"llama.cpp's repacked CPU weights (AMX / interleaved blocks) are off on this machine: "
                      f"{result.reason}; using its plain CPU kernels", LlamaCppCpuWarning, stacklevel=3)
    return result.passed
