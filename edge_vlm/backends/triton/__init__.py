"""The CUDA backend: Triton kernels, their drop-in modules, the fused decode step and CUDA graphs.

Every kernel here is written once in Triton and runs two ways: compiled for CUDA tensors, and
through Triton's interpreter for CPU tensors (that is how the tests check them without a GPU,
without ever setting TRITON_INTERPRET; see launcher.py). The runtime uses them only on CUDA
(`edge_vlm.backends.optimize_for_device`). Triton is optional (the `gpu` extra): only the kernel
modules import it, and nothing imports them until this backend is chosen. No GPU has run them
in this project: their speed is unmeasured (benchmarks/RESULTS.md, GPU figures: to be taken),
their arithmetic is tested through the interpreter, and on a GPU each is checked before it
serves (backends/first_run.py in a child process, then backends/gpu_path.py in-process).

- launcher.py: one kernel, compiled on CUDA or interpreted on CPU.
- w4a16.py, norms.py, rotary_kv.py, decode_attention.py, activations.py: the kernels.
- modules.py: the nn.Modules that replace WQLinear, the MLPs and the norms (`convert`).
- fused_decode.py: one static-shape decode step over those modules (what a CUDA graph records).
- cuda_graph.py: the engine that records that step once and replays it per token.
"""

from __future__ import annotations


def triton_available() -> bool:
    """True when Triton can be imported (it is an optional dependency: the `gpu` extra)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install is as good as none: fall back to torch
        return False
    return True
