"""Fused kernels for the GPU hot path (Triton), and the choice of path per device.

Every kernel here is written once in Triton and runs two ways: compiled for CUDA tensors, and
through Triton's interpreter for CPU tensors (that is how the tests check them without a GPU,
without ever setting TRITON_INTERPRET). The runtime uses them only on CUDA; on CPU it keeps the
plain torch path (see `dispatch.optimize_for_device`).
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
