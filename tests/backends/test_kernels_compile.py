"""Every Triton kernel compiles for real GPUs (H100 sm_90, Jetson Orin sm_87) without one.

The interpreter tests check what the kernels compute; this checks that the compiler accepts
them (it rejects things the interpreter allows, e.g. non-constexpr globals) and that ptxas
fits them in registers without spilling. Skipped only where Triton's NVIDIA backend (ptxas)
is not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


def _toolchain_present() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception:
        return False
    return True


pytestmark = pytest.mark.skipif(not _toolchain_present(), reason="Triton's NVIDIA backend (ptxas) is not installed")


def _aot_check():
    """scripts/aot_check.py, the developer tool these tests share their compiles with (not installed)."""
    path = Path(__file__).resolve().parents[2] / "scripts" / "aot_check.py"
    spec = importlib.util.spec_from_file_location("aot_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


aot_check = _aot_check()


def _variants():
    return aot_check.kernel_variants()


@pytest.mark.parametrize("capability", [90, 87])
def test_every_kernel_compiles_without_spills(capability):
    for name, kernel, signature, constexprs in _variants():
        compiled = aot_check.compile_for(kernel, signature, constexprs, capability)
        assert compiled.asm["cubin"], name
        regs, spills = aot_check.ptxas_usage(compiled.asm["ptx"], capability)
        assert 0 < regs <= 255 and spills == 0, f"{name} on sm_{capability}: {regs} registers, {spills} spill bytes"


def test_compiler_rejects_what_the_interpreter_would_allow():
    """The check has teeth: a kernel reading a non-constexpr global fails to compile."""
    from edge_vlm.backends.triton.launcher import kernel

    @kernel
    def bad(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.full((BLOCK,), SOME_GLOBAL, tl.float32))

    # The message names the global in a fresh process; once Triton's interpreter has run in the
    # same process (the CPU kernel tests) the front end fails on the same line with another message.
    with pytest.raises(Exception, match="global|block_argument"):
        aot_check.compile_for(bad, {"x_ptr": "*fp32"}, {"BLOCK": 16}, 90)
    good = kernel(_good_body)
    assert aot_check.compile_for(good, {"x_ptr": "*fp32"}, {"BLOCK": 16}, 90).asm["cubin"]


SOME_GLOBAL = 1.5


def _good_body(x_ptr, BLOCK: tl.constexpr):  # the same kernel with the value written in place
    tl.store(x_ptr + tl.arange(0, BLOCK), tl.full((BLOCK,), 1.5, tl.float32))


@pytest.mark.parametrize("capability", [90, 87])
def test_gemv_reads_int4_weights_in_16_byte_vector_loads(capability):
    """The packed layout exists so that weight loads are 16 bytes wide and coalesced: check the
    compiled GEMV really issues them (8 threads x 16 bytes = 128 contiguous bytes per row)."""
    ops = ("ld.global.v4.b32", "ld.global.v2.b32", "ld.global.b16", "ld.global.b8")
    assert [aot_check.load_bytes(op) for op in ops] == [16, 8, 2, 1]
    gemvs = [v for v in _variants() if v[0].startswith("w4a16_gemv")]
    assert len(gemvs) == 6
    for name, kernel, signature, constexprs in gemvs:
        compiled = aot_check.compile_for(kernel, signature, constexprs, capability, aot_check.LAUNCH_VALUES)
        loads = aot_check.global_loads(compiled.asm["ptx"])
        matrices = 2 if "act=2" in name else 1  # the gate+up epilogue reads two weight tiles per step
        assert loads["ld.global.v4.b32"] == matrices, (name, loads)
    # without the launch's divisibility the same kernel falls back to 4-byte loads: the check has teeth
    name, kernel, signature, constexprs = gemvs[0]
    plain = aot_check.compile_for(kernel, signature, constexprs, capability)
    assert aot_check.global_loads(plain.asm["ptx"])["ld.global.v4.b32"] == 0


@pytest.mark.parametrize("capability,instruction", [(90, "wgmma"), (87, "mma.sync")])
def test_gemm_runs_on_tensor_cores(capability, instruction):
    """Prefill's W4A16 GEMM feeds fp16 tiles to tl.dot: the compiled kernel must use the tensor-core
    instruction of the target (Hopper's wgmma, Ampere/Orin's mma.sync), not fp32 FMAs."""
    for name, kernel, signature, constexprs in _variants():
        if name.startswith("w4a16_gemm"):
            ptx = aot_check.compile_for(kernel, signature, constexprs, capability, aot_check.LAUNCH_VALUES).asm["ptx"]
            assert instruction in ptx, name
