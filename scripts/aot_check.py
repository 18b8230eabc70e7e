"""Compile every kernel for real GPU targets without a GPU (Triton front end + ptxas).

Triton can lower a kernel to PTX and a cubin for a named target with no device present. This
catches what the interpreter cannot: constructs the compiler rejects (non-constexpr globals,
type mismatches in loops), and it reports registers and spills per kernel from ptxas. A developer
tool, not part of the installed runtime: `python scripts/aot_check.py` prints the table of
benchmarks/RESULTS.md, and tests/backends/test_kernels_compile.py checks the same compiles.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

TARGETS = {"sm_90 (H100)": 90, "sm_87 (Jetson Orin)": 87}
# Integer arguments as a VILA1.5-3B decode step passes them (K = N = 2560, group 128, head dim 128,
# 4096-token cache): what Triton's JIT specialises on at run time (multiples of 16).
LAUNCH_VALUES = dict(N=2560, K=2560, KW=320, M=64, G=128, stride_xm=2560, stride_ym=2560, stride_qn=320,
                     stride_sn=20, D=2560, stride_x=2560, stride_r=2560, stride_y=2560, stride_s=2560, H=20,
                     HKV=20, R=128, stride_qt=2560, stride_kt=2560, stride_vt=2560, stride_cos=64,
                     stride_qot=2560, stride_qoh=128, stride_ch=4096 * 128, stride_cs=128, GROUP=1,
                     stride_qh=128, stride_kh=4096 * 128, stride_ks=128, stride_sh=4096, numel=6912, cols=6912,
                     stride_g=13824, stride_u=13824)


def kernel_variants():
    """(name, kernel, signature, constexprs) for every kernel and specialisation the runtime launches."""
    from edge_vlm.backends.triton.activations import _silu_mul
    from edge_vlm.backends.triton.decode_attention import _decode_attention
    from edge_vlm.backends.triton.norms import _add_norm
    from edge_vlm.backends.triton.rotary_kv import _rotary_kv
    from edge_vlm.backends.triton.w4a16 import _w4a16_gemm, _w4a16_gemv

    w4 = {"x_ptr": "*fp16", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": "*fp16", "y_ptr": "*fp16"}
    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    out = []
    for act in (0, 1, 2):
        for bias in (False, True):
            out.append((f"w4a16_gemv act={act} bias={bias}", _w4a16_gemv,
                        {**w4, **ints("N", "KW", "G", "stride_xm", "stride_ym", "stride_qn", "stride_sn")},
                        dict(HAS_BIAS=bias, ACT=act, BLOCK_N=16, BLOCK_W=32)))
    for act in (0, 1):
        out.append((f"w4a16_gemm act={act}", _w4a16_gemm,
                    {**w4, **ints("M", "N", "K", "KW", "G", "stride_xm", "stride_ym", "stride_qn", "stride_sn")},
                    dict(HAS_BIAS=True, ACT=act, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)))
    for kind in (0, 1):
        for res in (False, True):
            out.append((f"add_norm kind={kind} residual={res}", _add_norm,
                        {"x_ptr": "*fp16", "r_ptr": "*fp16", "w_ptr": "*fp16", "b_ptr": "*fp16", "y_ptr": "*fp16",
                         "sum_ptr": "*fp16", "D": "i32", "eps": "fp32",
                         **ints("stride_x", "stride_r", "stride_y", "stride_s")},
                        dict(HAS_RESIDUAL=res, KIND=kind, BLOCK_D=4096)))
    for quant in (False, True):
        cache = "*i8" if quant else "*fp16"
        out.append((f"rotary_kv int8={quant}", _rotary_kv,
                    {"q_ptr": "*fp16", "k_ptr": "*fp16", "v_ptr": "*fp16", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                     "pos_ptr": "*i32", "qo_ptr": "*fp16", "kc_ptr": cache, "vc_ptr": cache, "ks_ptr": "*fp32",
                     "vs_ptr": "*fp32", **ints("H", "HKV", "R", "stride_qt", "stride_kt", "stride_vt", "stride_cos",
                                               "stride_qot", "stride_qoh", "stride_ch", "stride_cs", "stride_sh")},
                    dict(D=128, BLOCK_D=128, QUANT=quant)))
        out.append((f"decode_attention int8={quant}", _decode_attention,
                    {"q_ptr": "*fp16", "k_ptr": cache, "v_ptr": cache, "ks_ptr": "*fp32", "vs_ptr": "*fp32",
                     "len_ptr": "*i32", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "GROUP": "i32",
                     "scale": "fp32", **ints("stride_qh", "stride_kh", "stride_ks", "stride_sh")},
                    dict(SPLITS=8, D=128, BLOCK_D=128, BLOCK_S=32, QUANT=quant)))
    out.append(("silu_mul", _silu_mul, {"g_ptr": "*fp16", "u_ptr": "*fp16", "y_ptr": "*fp16",
                                        **ints("numel", "cols", "stride_g", "stride_u")}, dict(BLOCK=1024)))
    return out


def compile_for(kernel, signature: dict, constexprs: dict, capability: int, values: dict | None = None):
    """The compiled kernel (PTX + cubin) of one specialisation for sm_<capability>.

    `values` (argument name -> the integer a launch passes) adds the specialisation Triton's
    JIT makes at run time: pointers (torch allocates them 16-byte aligned) and integers that are
    multiples of 16 are marked divisible by 16, which is what lets loads become vectors.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = triton.jit(kernel.fn)
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    attrs = {}
    if values is not None:
        for i, name in enumerate(fn.arg_names):
            kind = signature.get(name, "")  # constexprs are not arguments of the compiled kernel
            if kind.startswith("*") or (kind == "i32" and name in values and values[name] % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", capability, 32))


def load_bytes(op: str) -> int:
    """Bytes one thread reads with a PTX load, e.g. 'ld.global.v4.b32' -> 16."""
    vec = re.search(r"\.v(\d)", op)
    bits = re.search(r"\.[bfsu](\d+)$", op)
    return (int(vec.group(1)) if vec else 1) * int(bits.group(1)) // 8


def global_loads(ptx: str) -> Counter:
    """How many global loads of each width the PTX issues (e.g. 'ld.global.v4.b32' = 16 bytes)."""
    return Counter(re.findall(r"ld\.global(?:\.\w+)+", ptx))


def ptxas_usage(ptx: str, capability: int) -> tuple[int, int]:
    """(registers per thread, spill bytes) that ptxas reports for this PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(capability).path  # the ptxas Triton itself uses for this architecture
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        return _run_ptxas(ptxas, ptx, src)


def _run_ptxas(ptxas: str, ptx: str, src: Path) -> tuple[int, int]:
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)  # e.g. sm_90a, as Triton targets it
    res = subprocess.run([str(ptxas), "-v", f"--gpu-name={arch}", str(src), "-o", "/dev/null"],
                         capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", res.stderr)
    return (int(regs.group(1)) if regs else -1), sum(int(s) for s in spills)


def main() -> int:
    print("Specialised as a VILA1.5-3B decode launch (LAUNCH_VALUES).\n")
    print("| kernel | target | registers | spill bytes | global load instructions, bytes x count |\n|---|---|---|---|---|")
    for name, kern, sig, consts in kernel_variants():
        for target, cap in TARGETS.items():
            ptx = compile_for(kern, sig, consts, cap, LAUNCH_VALUES).asm["ptx"]
            regs, spills = ptxas_usage(ptx, cap)
            widths = Counter()
            for op, n in global_loads(ptx).items():
                widths[load_bytes(op)] += n
            loads = ", ".join(f"{b} x {n}" for b, n in sorted(widths.items(), reverse=True))
            print(f"| {name} | {target} | {regs} | {spills} | {loads} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
