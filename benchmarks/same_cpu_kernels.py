"""llama-cpp-python's own `Llama` and `llama_cpp.server` on the CPU kernels our llama.cpp path uses.

Our path loads a GGUF with llama.cpp's extra CPU buffer types (AMX tiles, repacked blocks) only
where a child process found them safe on this machine (backends/llamacpp/extra_buffers.py): on
some AMX CPUs they segfault. `Llama` and its server take no such setting and always turn them on,
so a baseline would either crash or run other kernels than ours. `same_kernels(gguf)` makes every
model `Llama` loads in this process use the verdict ours uses (set on the model parameters
llama.cpp hands out), so the comparison is of the two runtimes on the same kernels.

    python -m edge_vlm.benchmarks.same_cpu_kernels --model FILE.gguf [llama_cpp.server flags]
"""

from __future__ import annotations

import runpy
import sys

from edge_vlm.backends.llamacpp.extra_buffers import extra_buffers_safe


def same_kernels(gguf_path) -> bool:
    """Make llama-cpp-python load models with our extra-buffer verdict for `gguf_path`; returns it."""
    import llama_cpp.llama_cpp as lib  # optional dependency: the [llamacpp] extra installs it

    safe = extra_buffers_safe(gguf_path)
    default_params = getattr(lib.llama_model_default_params, "edge_vlm_default", lib.llama_model_default_params)

    def params():
        p = default_params()
        p.use_extra_bufts = safe
        return p

    params.edge_vlm_default = default_params
    lib.llama_model_default_params = params  # Llama.__init__ reads it through this module
    return safe


def main() -> None:
    """`python -m llama_cpp.server` with its own flags, on our kernels for the --model file."""
    argv = sys.argv[1:]
    if "--model" not in argv or argv.index("--model") + 1 >= len(argv):
        sys.exit("same_cpu_kernels: give --model FILE.gguf (then any llama_cpp.server flags)")
    safe = same_kernels(argv[argv.index("--model") + 1])
    print(f"llama_cpp.server with llama.cpp's extra CPU buffers {'on' if safe else 'off'} (as edge-vlm's path)",
          file=sys.stderr, flush=True)
    sys.argv = ["llama_cpp.server", *argv]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
