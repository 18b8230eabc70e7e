"""`edge-vlm doctor`: what works on this machine, found by trying it rather than guessed.

One command a Jetson or laptop user runs before (or after) a failed chat: torch and CUDA, the
GPU or the CPU and its vector flags, Triton and whether each kernel passes the same self-check
`load_model` runs (on a small stand-in model, so no download is needed; on a GPU first in a child
process, as at load), torch's int4 matmul, the first-run verdicts kept for this machine
(`--recheck` discards them), llama.cpp and ONNX Runtime when installed, free disk in the model
cache, and the backend `chat` would use. Progress goes to stderr as it goes; the report to stdout,
for people or (`--json`) programs. Exit status 1 when `chat` would find nothing usable on its
default device.

The tools built on the runtime add their own parts (the apps: OpenCV and the cameras it opens) as
`DoctorSection`s in the `edge_vlm.doctor` entry-point group, so the runtime checks them without
importing them; a section that fails to load or to run is one line of the report, not a crash.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ..backends import SelfCheckWarning, choose_backend, optimize_for_device, selfcheck, verdicts
from ..backends.cpu.int4_linear import CpuInt4Linear, cpu_int4_available
from ..backends.cpu.timing import cpu_bf16_matmul_is_faster, cpu_int4_compute_dtype
from ..backends.gpu_path import layers_per_shape, torch_int4_reason
from ..backends.llamacpp.choice import resolve_llm_backend
from ..backends.stand_in import fill_random
from ..backends.triton import triton_available
from ..formats.configs import LLMConfig, QuantConfig
from ..loading import default_device, default_dtype
from ..models.llm import DecoderLM
from ..models.quant_linear import prepare_quantized

STAND_IN = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4, num_kv_heads=2,
                head_dim=64, norm_eps=1e-5, max_position_embeddings=64)


SECTIONS = "edge_vlm.doctor"  # the entry-point group of the parts tools add (see pyproject.toml)
# the report's own keys: a section named like one of them would overwrite it
OWN_KEYS = ("python", "platform", "torch", "gpus", "cpu", "triton", "torch_int4", "first_run", "llama_cpp",
            "onnxruntime", "disk", "chat")


@runtime_checkable
class DoctorSection(Protocol):
    """A part of the report that a tool built on the runtime adds (the apps: OpenCV and cameras).
    An entry point of the `edge_vlm.doctor` group names an object with these members."""

    name: str  # its key in the report (and in `--json`)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Its own options of `edge-vlm doctor` (with defaults: `collect` without a command line uses them)."""

    def collect(self, options: argparse.Namespace, progress: Callable[[str], None]) -> dict:
        """Its part of the report, as plain data (JSON types); `progress` says what it is checking."""

    def lines(self, data: dict) -> list[str]:
        """Its lines of the human-readable report, from what `collect` returned."""


@dataclass(frozen=True)
class FailedSection:
    """A section that could not be loaded or set up, kept so the report says so in its place."""

    name: str
    reason: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass

    def collect(self, options: argparse.Namespace, progress: Callable[[str], None]) -> dict:
        return {"section_error": self.reason}

    def lines(self, data: dict) -> list[str]:
        return [failure_line(self.name, data.get("section_error", self.reason))]


def failure_line(name: str, reason: str) -> str:
    return f"  {name:<11} section failed: {reason}"


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def load_sections() -> list[DoctorSection]:
    """The installed sections by entry-point name; one that fails to import, or is not a section,
    becomes a `FailedSection` saying why."""
    sections = []
    for ep in sorted(entry_points(group=SECTIONS), key=lambda e: e.name):
        try:
            section = ep.load()
        except Exception as e:  # noqa: BLE001 - any fault in a tool's import is its line, not the doctor's crash
            sections.append(FailedSection(ep.name, f"cannot load {ep.value} ({_why(e)})"))
            continue
        if not isinstance(section, DoctorSection):
            sections.append(FailedSection(ep.name, f"{ep.value} is not a doctor section (needs name, "
                                                   "add_arguments, collect and lines)"))
        elif section.name in OWN_KEYS:
            sections.append(FailedSection(ep.name, f"{ep.value} is named {section.name!r}, a key of the report"))
        else:
            sections.append(section)
    return sections


def with_options(sections: Sequence[DoctorSection], parser: argparse.ArgumentParser) -> list[DoctorSection]:
    """Each section's options added to `parser`; one whose options cannot be added becomes a `FailedSection`."""
    kept = []
    for section in sections:
        try:
            section.add_arguments(parser)
        except Exception as e:  # noqa: BLE001 - e.g. an option that clashes with one of the doctor's
            section = FailedSection(section.name, f"cannot add its options ({_why(e)})")
        kept.append(section)
    return kept


def collect_section(section: DoctorSection, options: argparse.Namespace, progress: Callable[[str], None]) -> dict:
    """A section's part of the report; if it raises, `{"section_error": why}` in its place."""
    try:
        data = section.collect(options, progress)
        if not isinstance(data, dict):
            raise TypeError(f"collect returned {type(data).__name__}, not a dict")
        json.dumps(data)  # plain data, or `--json` would fail after everything else was checked
    except Exception as e:  # noqa: BLE001 - a tool's fault is its line of the report, not the doctor's crash
        return {"section_error": f"collect raised {_why(e)}"}
    return data


def section_lines(section: DoctorSection, data: dict) -> list[str]:
    """A section's lines, or the one line that says why there are none."""
    if "section_error" in data:
        return [failure_line(section.name, data["section_error"])]
    try:
        return list(section.lines(data))
    except Exception as e:  # noqa: BLE001
        return [failure_line(section.name, f"lines raised {_why(e)}")]


def register(sub) -> None:
    p = sub.add_parser("doctor", help="what works on this machine: GPU, kernels, int4 paths, cameras, disk",
                       description="Check torch, the GPU or CPU, the Triton kernels, torch's int4 matmul, "
                                   "llama.cpp, ONNX Runtime and free disk, and what the installed tools add "
                                   "(OpenCV and its cameras); say which backend `chat` would use. Exit status 1 "
                                   "when nothing usable is found.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--interpreter", action="store_true",
                   help="without a CUDA GPU, check the Triton kernels through Triton's interpreter (slow)")
    p.add_argument("--recheck", action="store_true",
                   help="discard the first-run verdicts kept for this machine (which GPU kernels passed their "
                        "check in a child process) first, so the doctor and the next load check again")
    sections = with_options(load_sections(), p)
    p.set_defaults(func=functools.partial(run_doctor, sections=sections))


def run_doctor(args, sections: Sequence[DoctorSection] = ()) -> int:
    report = collect(interpreter=args.interpreter, recheck=args.recheck, progress=_progress, sections=sections,
                     options=args)
    print(json.dumps(report, indent=2) if args.json else format_report(report, sections))
    return 0 if report["chat"]["usable"] else 1


def _progress(message: str) -> None:
    print(f"doctor: {message}", file=sys.stderr, flush=True)


def collect(interpreter: bool = False, recheck: bool = False, progress=lambda message: None,
            sections: Sequence[DoctorSection] | None = None, options: argparse.Namespace | None = None,
            **overrides) -> dict:
    """The whole report as plain data (what `--json` prints). `sections` default to the installed
    ones; they read their options from `options` (the parsed command line), else from their own
    defaults with `overrides` on top (`collect(cameras=0)`)."""
    if sections is None:
        sections = load_sections()
    if options is None:
        defaults = argparse.ArgumentParser(add_help=False)
        sections = with_options(sections, defaults)
        options = argparse.Namespace(**{**vars(defaults.parse_args([])), **overrides})
    discarded = 0
    if recheck:

        progress("discarding the first-run verdicts")
        discarded = verdicts.discard()
    progress("torch and devices")
    report = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch_info(),
              "gpus": gpu_info(), "cpu": cpu_info()}
    cuda = bool(report["gpus"])
    progress("Triton kernels" + (" (self-check on the GPU)" if cuda else " (through the interpreter)"
                                 if interpreter else ""))
    report["triton"] = triton_info(torch.device("cuda") if cuda else torch.device("cpu"), cuda or interpreter)
    progress("torch's int4 matmul")
    report["torch_int4"] = torch_int4_info(torch.device("cuda") if cuda else torch.device("cpu"))
    report["first_run"] = first_run_info(discarded)
    progress("llama.cpp and ONNX Runtime")
    report["llama_cpp"], report["onnxruntime"] = llama_cpp_info(), onnxruntime_info()
    for section in sections:
        report[section.name] = collect_section(section, options, progress)
    report["disk"] = disk_info()
    progress("the backend chat would use")
    report["chat"] = chat_info(report)
    return report


# ---------------------------------------------------------------- torch, GPU, CPU

def torch_info() -> dict:
    return {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "cpu_capability": _cpu_capability()}


def _cpu_capability() -> str | None:
    """The vector ISA torch's CPU kernels dispatch to here (AVX2, AVX512, ...): works on any OS."""
    with contextlib.suppress(Exception):
        return torch.backends.cpu.get_cpu_capability()
    return None


def gpu_info() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpu = {"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": p.total_memory / 2**30}
        with contextlib.suppress(Exception):
            gpu["free_gib"] = torch.cuda.mem_get_info(i)[0] / 2**30
        gpus.append(gpu)
    return gpus


CPU_FLAGS = {"avx2": ("avx2",), "avx512": ("avx512f",), "avx512_bf16": ("avx512_bf16",),
             "amx": ("amx_bf16", "amx_tile")}


def cpu_info(cpuinfo: str | None = None) -> dict:
    """The CPU's name, cores and the flags the CPU int4 and bf16 paths depend on. Linux reads
    /proc/cpuinfo; elsewhere the flags are unknown (None) and torch's dispatch level is shown."""
    if cpuinfo is None:
        with contextlib.suppress(OSError):
            cpuinfo = Path("/proc/cpuinfo").read_text()
    info = {"model": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "flags": {name: None for name in CPU_FLAGS}}
    if cpuinfo:
        fields = {}
        for line in cpuinfo.splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        info["model"] = fields.get("model name") or info["model"]
        flags = set(fields.get("flags", "").split())
        if flags:
            info["flags"] = {name: any(f in flags for f in names) for name, names in CPU_FLAGS.items()}
    return info


# ---------------------------------------------------------------- kernels

def stand_in_llm(arch: str, device: torch.device, dtype: torch.dtype):
    """A one-layer random int4 model of `arch` (llama: RMSNorm + gated SiLU; nemotron: LayerNorm1P +
    relu^2, partial rotary): every kernel variant a real model of that family uses, in seconds."""

    cfg = LLMConfig(arch=arch, partial_rotary_factor=0.5 if arch == "nemotron" else 1.0, **STAND_IN)
    llm = DecoderLM(cfg).to(dtype)
    prepare_quantized(llm, QuantConfig(group_size=128))
    llm = llm.to(device)
    fill_random(llm)
    return llm.eval()


def triton_info(device: torch.device, run_checks: bool) -> dict:
    """Triton's version and, where asked, each kernel's self-check on stand-ins of both families."""

    info: dict = {"installed": triton_available(), "version": None, "checked_on": None, "kernels": {}}
    if not info["installed"]:
        return info
    # optional: triton (the gpu extra)
    import triton

    info["version"] = triton.__version__
    if not run_checks:
        return info

    info["checked_on"] = "cuda" if device.type == "cuda" else "interpreter"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    for arch in ("llama", "nemotron"):
        llm = stand_in_llm(arch, device, dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SelfCheckWarning)  # reported below instead (first-run ones too)
            report = optimize_for_device(llm, backend="triton").report  # on CUDA: the child check first, as at load
        for c in report.checks:
            key = c.op if c.op in ("w4a16_gemv", "w4a16_gemm", "rotary_kv", "decode_attention") else f"{c.op} ({arch})"
            old = info["kernels"].get(key)
            if old is None or (old["passed"] and not c.passed):
                info["kernels"][key] = {"passed": c.passed, "reason": c.reason, "seconds": round(c.seconds, 3)}
        info.setdefault("paths", {})[arch] = {"linear": report.linear, "fused_mlp": report.fused_mlp,
                                              "fused_norm": report.fused_norm, "fused_decode": report.fused_decode}
    return info


def torch_int4_info(device: torch.device) -> dict:
    """torch's int4 matmul on `device`: the CUDA kernel (sm80+) or the CPU one chat uses on CPU."""

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    info = {"device": device.type, "op": "_weight_int4pack_mm" if device.type == "cuda" else
            "_weight_int4pack_mm_for_cpu"}
    if device.type == "cpu":

        if not cpu_int4_available():
            return {**info, "passed": False, "reason": "this torch has no int4 CPU matmul"}
        compute = cpu_int4_compute_dtype()
        info["compute_dtype"] = str(compute).replace("torch.", "")
        layer = layers_per_shape(stand_in_llm("llama", device, dtype))[0]
        ins = selfcheck.Inputs(device, dtype)
        check = selfcheck.run_check("cpu_int4", lambda: selfcheck.check_linear(CpuInt4Linear(layer, compute), layer,
                                                                               1, ins, compute), device)
    else:
        layers = layers_per_shape(stand_in_llm("llama", device, dtype))
        check = selfcheck.run_check("torch_int4", lambda: torch_int4_reason(layers, selfcheck.Inputs(device, dtype)),
                                    device)
    return {**info, "passed": check.passed, "reason": check.reason}


def first_run_info(discarded: int = 0) -> dict:
    """The first-run verdicts kept in the cache folder: per file, the device, the model family,
    whether it was made under the versions installed now, and what failed."""

    kept = []
    for path, v in verdicts.all_verdicts():
        if v is None:
            kept.append({"file": str(path), "error": "not a verdict of this format (ignored; rewritten on use)"})
            continue
        dev = v.key.get("device", {})
        kept.append({"file": str(path), "device": f"{dev.get('name')} ({dev.get('capability')})",
                     "family": family_summary(v.key.get("family", {})), "stale": verdicts.stale(v),
                     "checked_at": v.checked_at, "children": v.children, "seconds": v.seconds,
                     "passed": [op for op, r in v.ops.items() if r.passed], "failed": v.failures()})
    return {"folder": str(verdicts.folder()), "discarded": discarded, "verdicts": kept}


def family_summary(family: dict) -> str:
    """A model shape family in a few words: 'llama 2048x5632, 32/8 heads of 64, vocab 32000, float16, int4 g128'."""
    if "summary" in family:  # a non-GPU verdict (llama.cpp's extra CPU buffers) says itself what it covers
        return family["summary"]
    c = family.get("llm", {})
    groups = sorted(set(family.get("int4", {}).values()))
    return (f"{c.get('arch')} {c.get('hidden_size')}x{c.get('intermediate_size')}, {c.get('num_heads')}/"
            f"{c.get('num_kv_heads')} heads of {c.get('head_dim')}, vocab {c.get('vocab_size')}, {family.get('dtype')}"
            + (f", int4 g{'/'.join(map(str, groups))}" if groups else ", 16-bit")
            + (", int8 KV cache" if family.get("kv_cache_int8") else "")
            + ("" if family.get("triton", True) else ", without Triton"))


# ---------------------------------------------------------------- other runtimes, disk

def llama_cpp_info() -> dict:
    try:
        # optional: llama-cpp-python (the llamacpp extra)
        import llama_cpp
    except Exception as e:  # noqa: BLE001 - absent or broken: either way not usable
        return {"installed": False, "reason": type(e).__name__}
    info = {"installed": True, "version": getattr(llama_cpp, "__version__", None)}
    offload = getattr(llama_cpp, "llama_supports_gpu_offload", None)
    with contextlib.suppress(Exception):
        info["gpu_offload"] = bool(offload()) if offload else None
    return info


def onnxruntime_info() -> dict:
    try:
        # optional: onnxruntime (the onnx extra)
        import onnxruntime
    except Exception as e:  # noqa: BLE001
        return {"installed": False, "reason": type(e).__name__}
    return {"installed": True, "version": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}


def disk_info() -> dict:
    """Free space where models are downloaded (huggingface_hub's cache, created on first use)."""
    try:
        # probed: doctor reports whether it imports
        from huggingface_hub import constants

        cache = Path(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001
        cache = Path.home() / ".cache" / "huggingface" / "hub"
    existing = next((p for p in [cache, *cache.parents] if p.exists()), Path.cwd())
    usage = shutil.disk_usage(existing)
    return {"model_cache": str(cache), "free_gib": usage.free / 2**30, "total_gib": usage.total / 2**30}


# ---------------------------------------------------------------- what chat would do

def chat_info(report: dict) -> dict:
    """The device, dtype and paths `chat` picks by default, and whether that device works at all."""

    device = default_device()

    info = {"device": device, "dtype": str(default_dtype(device)).replace("torch.", ""),
            "backend": choose_backend(torch.device(device)), "llm_backend": resolve_llm_backend("auto", device)}
    reason = _reference_decode_reason(torch.device(device))
    info["usable"], info["reason"] = reason is None, reason or ""
    if reason is not None and device != "cpu" and _reference_decode_reason(torch.device("cpu")) is None:
        info["hint"] = "the CPU works: run chat with --device cpu"
    if device == "cpu":
        i4 = report["torch_int4"]
        info["int4_linears"] = (f"torch's int4 CPU matmul ({i4.get('compute_dtype')} activations)" if i4.get("passed")
                                else "dequantize + matmul")
        info["decode"] = "plain torch"

        info["vision_dtype"] = "bfloat16" if cpu_bf16_matmul_is_faster() else "float32"
    else:
        paths = report["triton"].get("paths", {}).get("llama")
        linear = paths["linear"] if paths else ("torch_int4" if report["torch_int4"]["passed"] else "reference")
        info["int4_linears"] = {"triton": "Triton W4A16 kernels", "torch_int4": "torch's int4 CUDA matmul",
                                "reference": "dequantize + matmul"}[linear]
        graph = report["triton"]["kernels"].get("cuda_graph (llama)", {}).get("passed", False)
        info["decode"] = "CUDA graph of the fused step" if paths and paths["fused_decode"] and graph else "plain torch"
    return info


def _reference_decode_reason(device: torch.device) -> str | None:
    """Why the plain torch path (dequantize + matmul, what every fallback ends at) fails here."""

    def run():
        layer = layers_per_shape(stand_in_llm("llama", device, torch.float32))[0]
        return selfcheck.check_linear(layer, layer, 1, selfcheck.Inputs(device, torch.float32))

    check = selfcheck.run_check("reference", run, device)
    return None if check.passed else check.reason


# ---------------------------------------------------------------- the human-readable report

def _yes(flag) -> str:
    return "?" if flag is None else "yes" if flag else "no"


def _first_run_lines(fr: dict | None) -> list[str]:
    if fr is None:
        return []
    gone = f"{fr['discarded']} discarded; " if fr["discarded"] else ""
    if not fr["verdicts"]:
        return [f"  first-run   {gone}no verdicts kept in {fr['folder']} (made the first time a GPU path is used)"]
    lines = [f"  first-run   {gone}{len(fr['verdicts'])} verdict(s) in {fr['folder']} "
             "(--recheck discards them):"]
    for v in fr["verdicts"]:
        if "error" in v:
            lines.append(f"                {Path(v['file']).name}: {v['error']}")
            continue
        state = ("FAILED " + "; ".join(f"{op} ({why})" for op, why in v["failed"].items()) if v["failed"]
                 else f"all {len(v['passed'])} checks passed")
        lines.append(f"                {v['device']}, {v['family']}: {state}; {v['children']} child process(es), "
                     f"{v['seconds']:.1f} s, {v['checked_at']}" + (" (STALE: other versions; ignored)" if v["stale"]
                                                                   else ""))
    return lines


def format_report(r: dict, sections: Sequence[DoctorSection] | None = None) -> str:
    """The report for people; the sections (default: the installed ones) render their own parts."""
    t, cpu = r["torch"], r["cpu"]
    flags = ", ".join(f"{name.upper().replace('_', '-')} {_yes(v)}" for name, v in cpu["flags"].items())
    lines = [
        "edge-vlm doctor",
        f"  python      {r['python']} on {r['platform']}",
        f"  torch       {t['version']}, CUDA {t['cuda'] or 'none (CPU build)'}, "
        f"CPU kernels at {t['cpu_capability'] or '?'}",
    ]
    if r["gpus"]:
        for g in r["gpus"]:
            free = f", {g['free_gib']:.1f} free" if "free_gib" in g else ""
            lines.append(f"  GPU {g['index']}       {g['name']}, compute capability {g['capability']}, "
                         f"{g['memory_gib']:.1f} GiB{free}")
    else:
        lines.append("  GPU         none found by torch")
    lines.append(f"  CPU         {cpu['model']}, {cpu['cores']} cores: {flags}")
    tr = r["triton"]
    if not tr["installed"]:
        lines.append("  Triton      not installed (CUDA then uses torch's int4 matmul; on Windows: "
                     "pip install triton-windows)")
    elif not tr["kernels"]:
        lines.append(f"  Triton      {tr['version']}; kernels not checked: no CUDA GPU "
                     "(--interpreter checks them through Triton's interpreter)")
    else:
        lines.append(f"  Triton      {tr['version']}; kernel self-check on {tr['checked_on']}:")
        for op, c in tr["kernels"].items():
            lines.append(f"                {op:28s} {'passed' if c['passed'] else 'FAILED: ' + c['reason']}")
    i4 = r["torch_int4"]
    dtype = f", {i4['compute_dtype']} activations" if "compute_dtype" in i4 else ""
    lines.append(f"  int4        torch {i4['op']} on {i4['device']}: "
                 f"{'passed' if i4['passed'] else 'FAILED: ' + i4['reason']}{dtype}")
    lines.extend(_first_run_lines(r.get("first_run")))
    lc = r["llama_cpp"]
    lines.append(f"  llama.cpp   {lc.get('version') or 'installed' if lc['installed'] else 'not installed'}"
                 + (f", GPU offload {_yes(lc.get('gpu_offload'))}" if lc["installed"] else ""))
    ort = r["onnxruntime"]
    lines.append(f"  ONNX RT     {ort['version'] + ': ' + ', '.join(ort['providers']) if ort['installed'] else 'not installed'}")
    for section in load_sections() if sections is None else sections:
        if section.name in r:
            lines.extend(section_lines(section, r[section.name]))
    d = r["disk"]
    lines.append(f"  disk        {d['free_gib']:.1f} GiB free of {d['total_gib']:.1f} at {d['model_cache']}")
    c = r["chat"]
    if c["usable"]:
        llm = ("the LLM in llama.cpp (--backend torch: " if c["llm_backend"] == "llama.cpp" else "the LLM in torch (")
        lines.append(f"  chat        would run on {c['device']} ({c['dtype']}, backend {c['backend']}): "
                     f"{llm}int4 linears via {c['int4_linears']}, decode {c['decode']})"
                     + (f", vision tower in {c['vision_dtype']}" if "vision_dtype" in c else ""))
    else:
        lines.append(f"  chat        NOTHING USABLE on {c['device']}: {c['reason']}"
                     + (f" ({c['hint']})" if c.get("hint") else ""))
    return "\n".join(lines)
