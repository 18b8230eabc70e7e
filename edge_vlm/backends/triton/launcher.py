"""One Triton kernel, two ways to run it: compiled on CUDA, interpreted on CPU tensors.

Triton decides between JIT and interpreter when a function is decorated, from the
TRITON_INTERPRET environment variable. Setting that variable for the tests would leak into
everything imported afterwards, so instead each kernel is kept as a plain function and wrapped
lazily, per device: `kernel.on(tensor.device)[grid](...)`. The interpreter then runs the very
same kernel body on CPU tensors (slowly: tests use small shapes).

Triton's own helpers (`tl.sum`, `tl.zeros`, ...) were decorated in JIT mode when Triton was
imported, and a JIT function refuses to be called from Python. While (and only while) an
interpreted kernel runs, `_jit_helpers_interpreted` lets such helpers run through the
interpreter too; the patch is undone when the launch returns, so nothing outlives the call.
The interpreter also writes its own names into the globals of the functions it runs, so it
is given copies with private globals (`_isolated`): kernels compiled later in the same
process (CUDA tests after CPU ones) see their modules untouched.
"""

from __future__ import annotations

import contextlib
import threading
import types

import torch

_patch_lock = threading.Lock()


class Kernel:
    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self._compiled = None
        self._interpreted = None

    def on(self, device: torch.device | str):
        if torch.device(device).type == "cpu":
            if self._interpreted is None:
                # optional: triton (the gpu extra)
                from triton.runtime.interpreter import InterpretedFunction

                self._interpreted = _Interpreted(InterpretedFunction(_isolated(self.fn)))
            return self._interpreted
        if self._compiled is None:
            # optional: triton (the gpu extra)
            import triton

            self._compiled = triton.jit(self.fn)
        return self._compiled


def kernel(fn) -> Kernel:
    """Decorator: a Triton kernel usable on CUDA (compiled) and CPU (interpreted) tensors."""
    return Kernel(fn)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _isolated(fn):
    """A copy of `fn` with its own globals dict.

    The interpreter copies its own module's names into the globals of every function it runs;
    on the real function that would pollute the kernel's module (and Triton's standard library),
    and the compiler, which resolves names in those globals, then fails on the same kernels.
    """
    clone = types.FunctionType(fn.__code__, dict(fn.__globals__), fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__annotations__ = dict(getattr(fn, "__annotations__", {}))
    clone.__kwdefaults__ = fn.__kwdefaults__
    clone.__module__, clone.__qualname__, clone.__doc__ = fn.__module__, fn.__qualname__, fn.__doc__
    return clone


@contextlib.contextmanager
def _jit_helpers_interpreted():
    # optional: triton (the gpu extra)
    from triton.runtime.interpreter import InterpretedFunction, _patch_lang
    from triton.runtime.jit import JITFunction

    cache: dict = {}

    def call(self, *args, **kwargs):
        # InterpretedFunction.__call__ would patch triton.language for good (it never restores:
        # under TRITON_INTERPRET nothing else runs); patch for the call only, then restore
        if self.fn not in cache:
            cache[self.fn] = InterpretedFunction(_isolated(self.fn))
        helper = cache[self.fn]
        scope = _patch_lang(helper.fn)
        try:
            return helper.rewrite()(*args, **kwargs)
        finally:
            scope.restore()

    with _patch_lock:
        saved = JITFunction.__call__
        JITFunction.__call__ = call
        try:
            yield
        finally:
            JITFunction.__call__ = saved


class _Interpreted:
    """`fn[grid](*args)` through the interpreter, with Triton's jitted helpers callable."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with _jit_helpers_interpreted():
                return self.fn[grid](*args, **kwargs)
        return launch
