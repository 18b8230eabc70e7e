"""`edge-vlm doctor`: runs on this machine and names its real state; never hangs on a camera;
exits non-zero when the default device cannot run even the plain torch path; takes extra sections
from the `edge_vlm.doctor` entry points, and a broken one is one line of the report."""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

from edge_vlm.apps.media import doctor as camera_doctor
from edge_vlm.cli import doctor
from edge_vlm.cli import main

AVX2_ONLY = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma
"""
SAPPHIRE_RAPIDS = """model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_cpu_flags_are_read_from_cpuinfo():
    info = doctor.cpu_info(AVX2_ONLY)
    assert info["model"] == "AMD EPYC 7B13"
    assert info["flags"] == {"avx2": True, "avx512": False, "avx512_bf16": False, "amx": False}
    assert doctor.cpu_info(SAPPHIRE_RAPIDS)["flags"] == {"avx2": True, "avx512": True, "avx512_bf16": True,
                                                         "amx": True}


def test_without_cpuinfo_the_flags_are_unknown_not_guessed(monkeypatch):
    with monkeypatch.context() as m:  # only around cpu_info: collect reads files too (the entry points)
        m.setattr(doctor.Path, "read_text", lambda self: (_ for _ in ()).throw(OSError("no /proc")))
        info = doctor.cpu_info()
    assert set(info["flags"].values()) == {None} and info["cores"] >= 1
    assert "AVX2 ?" in doctor.format_report({**doctor.collect(cameras=0), "cpu": info})


@pytest.fixture(scope="module")
def machine():
    return doctor.collect(cameras=2)


def test_the_report_names_this_machines_real_state(machine):
    assert machine["torch"]["version"] == torch.__version__
    assert machine["torch"]["cuda_available"] == torch.cuda.is_available() == bool(machine["gpus"])
    try:
        cpuinfo = open("/proc/cpuinfo").read()
    except OSError:
        cpuinfo = None
    if cpuinfo:
        flags = set(next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split(":")[1].split())
        assert machine["cpu"]["flags"]["avx2"] == ("avx2" in flags)
        assert machine["cpu"]["flags"]["avx512_bf16"] == ("avx512_bf16" in flags)
    text = doctor.format_report(machine)
    want_avx2 = {True: "AVX2 yes", False: "AVX2 no", None: "AVX2 ?"}[machine["cpu"]["flags"]["avx2"]]
    assert want_avx2 in text and "AVX512-BF16" in text
    assert machine["chat"]["usable"] and machine["chat"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert f"would run on {machine['chat']['device']}" in text
    # the LLM backend chat's default (--backend auto) picks: llama.cpp on a CPU with llama-cpp-python
    cpp = machine["chat"]["device"] == "cpu" and machine["llama_cpp"]["installed"]
    assert machine["chat"]["llm_backend"] == ("llama.cpp" if cpp else "torch")
    assert ("the LLM in llama.cpp" if cpp else "the LLM in torch") in text
    json.dumps(machine)  # plain data all the way down


def test_the_int4_path_chat_uses_passes_its_own_check(machine):
    i4 = machine["torch_int4"]
    if machine["gpus"]:
        assert i4["op"] == "_weight_int4pack_mm"
    else:
        assert i4["op"] == "_weight_int4pack_mm_for_cpu" and i4["passed"], i4
        assert "torch's int4 CPU matmul" in machine["chat"]["int4_linears"]


def test_optional_runtimes_are_reported_as_found(machine):
    for name, module in (("onnxruntime", "onnxruntime"), ("llama_cpp", "llama_cpp"), ("opencv", "cv2")):
        try:
            __import__(module)
            installed = True
        except ImportError:
            installed = False
        assert machine[name]["installed"] == installed
    if machine["onnxruntime"]["installed"]:
        import onnxruntime

        assert machine["onnxruntime"]["providers"] == onnxruntime.get_available_providers()
    if machine["opencv"]["installed"]:
        import cv2

        assert machine["opencv"]["gstreamer"] == ("GStreamer:                   YES" in cv2.getBuildInformation()
                                                  or any(line.strip().startswith("GStreamer:") and "YES" in line
                                                         for line in cv2.getBuildInformation().splitlines()))


def test_free_disk_is_measured_where_models_are_cached(machine):
    import shutil

    d = machine["disk"]
    assert "huggingface" in d["model_cache"] and 0 < d["free_gib"] <= d["total_gib"]
    assert abs(d["total_gib"] - shutil.disk_usage(next(p for p in [doctor.Path(d["model_cache"]),
                                                                  *doctor.Path(d["model_cache"]).parents]
                                                       if p.exists())).total / 2**30) < 1e-6


def test_cli_prints_json_and_shows_progress_on_stderr(capsys):
    assert main(["doctor", "--json", "--cameras", "0"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["chat"]["usable"] and report["opencv"].get("cameras", {}).get("probed", 0) == 0
    assert err.splitlines()[0] == "doctor: torch and devices" and "doctor: the backend chat would use" in err


def test_cli_human_output(capsys):
    assert main(["doctor", "--cameras", "0"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("edge-vlm doctor\n") and "  chat        would run on" in out


def test_exit_status_is_1_when_the_plain_path_fails_on_the_default_device(monkeypatch, capsys):
    """A real fault in the plain torch path (every fallback ends there): dequantization that
    returns NaN. Then chat has nothing usable, and the doctor says so and exits 1."""
    from edge_vlm.models import quant_linear

    real = quant_linear.dequantize_gemm
    monkeypatch.setattr(quant_linear, "dequantize_gemm", lambda *a, **k: real(*a, **k) * float("nan"))
    assert main(["doctor", "--cameras", "0"]) == 1
    out, _ = capsys.readouterr()
    assert "NOTHING USABLE on" in out and "NaN" in out


def test_a_blocking_camera_driver_cannot_hang_the_doctor(monkeypatch):
    """The probe runs in a child process killed after its time: the first index answered, the
    second blocked forever."""
    monkeypatch.setattr(camera_doctor, "no_video_devices", lambda: False)
    monkeypatch.setattr(camera_doctor, "_CAMERA_PROBE", "import json, time\n"
                        "print(json.dumps({'index': 0, 'opened': True, 'frame': [640, 480]}), flush=True)\n"
                        "time.sleep(3600)\n")
    start = time.monotonic()
    cams = camera_doctor.probe_cameras(2, seconds_each=0.5)
    assert time.monotonic() - start < 15
    assert cams["probed"] == 1 and cams["opened"] == [{"index": 0, "opened": True, "frame": [640, 480]}]
    assert "timed out" in cams["note"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /dev")
def test_cameras_are_probed_only_where_a_device_exists(monkeypatch):
    monkeypatch.setattr(camera_doctor, "no_video_devices", lambda: True)
    assert camera_doctor.probe_cameras(4) == {"probed": 0, "opened": [], "note": "no /dev/video* device"}


def test_kernel_self_check_through_the_interpreter_reports_a_failing_kernel(monkeypatch):
    """`--interpreter` runs the load-time self-check on the stand-in models: with the fused norm
    kernel returning NaN, the doctor names it (for both families) and the fused step is off."""
    pytest.importorskip("triton")
    from edge_vlm.backends.triton import norms
    from tests.backends.test_selfcheck import Faulty

    monkeypatch.setattr(norms, "_add_norm", Faulty(norms._add_norm, "nan", 4))
    info = doctor.triton_info(torch.device("cpu"), run_checks=True)
    assert info["checked_on"] == "interpreter"
    k = info["kernels"]
    assert not k["fused_norm (llama)"]["passed"] and "NaN" in k["fused_norm (llama)"]["reason"]
    assert not k["fused_norm (nemotron)"]["passed"]
    assert k["w4a16_gemv"]["passed"] and k["w4a16_gemm"]["passed"] and k["epilogue (nemotron)"]["passed"]
    assert info["paths"]["llama"] == {"linear": "triton", "fused_mlp": True, "fused_norm": False,
                                      "fused_decode": False}
    report = {**doctor.collect(cameras=0), "triton": info}
    text = doctor.format_report(report)
    assert "fused_norm (llama)           FAILED: without residual: NaN or inf in the output" in text


# ---------------------------------------------------------------- sections from entry points

class CountingSection:
    """A section as a tool would write one: its own option, its data, its line."""

    name = "counting"

    def add_arguments(self, parser):
        parser.add_argument("--count-to", type=int, default=2)

    def collect(self, options, progress):
        progress(f"counting to {options.count_to}")
        return {"numbers": list(range(1, options.count_to + 1))}

    def lines(self, data):
        return [f"  counting    {', '.join(map(str, data['numbers']))}"]


class RaisingSection(CountingSection):
    name = "raising"

    def add_arguments(self, parser):
        pass

    def collect(self, options, progress):
        raise RuntimeError("the probe fell over")


class BadLinesSection(CountingSection):
    name = "badlines"

    def add_arguments(self, parser):
        pass

    def lines(self, data):
        return [data["missing"]]


COUNTING, RAISING, BAD_LINES, NOT_A_SECTION = CountingSection(), RaisingSection(), BadLinesSection(), object()


def _injected(monkeypatch, *extra: tuple[str, str]):
    """The entry-point lookup doctor uses, with `extra` (name, value) entries beside the installed ones."""
    real = doctor.entry_points

    def lookup(group):
        mine = [EntryPoint(name, value, group) for name, value in extra] if group == doctor.SECTIONS else []
        return [*real(group=group), *mine]

    monkeypatch.setattr(doctor, "entry_points", lookup)


def test_the_camera_section_is_declared_by_the_apps_and_loads():
    declared = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["entry-points"]
    assert declared[doctor.SECTIONS] == {"opencv": "edge_vlm.apps.media.doctor:section"}
    (section,) = doctor.load_sections()
    assert section is camera_doctor.section and isinstance(section, doctor.DoctorSection)


def test_an_injected_section_adds_its_option_its_part_of_the_json_and_its_progress(monkeypatch, capsys):
    _injected(monkeypatch, ("counting", "tests.runtime.test_doctor:COUNTING"))
    assert main(["doctor", "--json", "--cameras", "0", "--count-to", "3"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["counting"] == {"numbers": [1, 2, 3]}
    keys = list(report)  # the tools' parts stand between the other runtimes and the disk, in name order
    assert keys.index("onnxruntime") < keys.index("counting") < keys.index("opencv") < keys.index("disk")
    assert report["opencv"]["cameras"]["note"] == "not probed"  # --cameras still reaches its section
    assert "doctor: counting to 3\n" in err
    # without a command line, a section's own defaults, with the caller's values on top
    assert doctor.collect(cameras=0)["counting"] == {"numbers": [1, 2]}
    assert doctor.collect(cameras=0, count_to=1)["counting"] == {"numbers": [1]}


def test_a_broken_section_is_one_line_of_the_report_not_a_crash(monkeypatch, capsys):
    _injected(monkeypatch, ("missing", "tests.no_such_module:section"), ("raising", "tests.runtime.test_doctor:RAISING"),
              ("badlines", "tests.runtime.test_doctor:BAD_LINES"), ("notone", "tests.runtime.test_doctor:NOT_A_SECTION"),
              ("counting", "tests.runtime.test_doctor:COUNTING"))
    assert main(["doctor", "--cameras", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    failed = [line for line in out if "section failed" in line]
    assert failed == [
        "  badlines    section failed: lines raised KeyError: 'missing'",
        "  missing     section failed: cannot load tests.no_such_module:section "
        "(ModuleNotFoundError: No module named 'tests.no_such_module')",
        "  notone      section failed: tests.runtime.test_doctor:NOT_A_SECTION is not a doctor section (needs name, "
        "add_arguments, collect and lines)",
        "  raising     section failed: collect raised RuntimeError: the probe fell over",
    ]
    assert "  counting    1, 2" in out and any(line.startswith("  OpenCV      ") for line in out)
    assert out[-1].startswith("  chat        would run on")  # the rest of the report is all there
    assert main(["doctor", "--json", "--cameras", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["raising"] == {"section_error": "collect raised RuntimeError: the probe fell over"}
    assert report["missing"]["section_error"].startswith("cannot load") and report["chat"]["usable"]


def test_a_section_that_returns_no_plain_data_or_clashes_fails_alone():
    class NotJSON(CountingSection):
        def collect(self, options, progress):
            return {"when": time}  # a module: not JSON

    data = doctor.collect_section(NotJSON(), argparse.Namespace(count_to=1), lambda _m: None)
    assert data["section_error"].startswith("collect raised TypeError")
    parser = argparse.ArgumentParser()
    parser.add_argument("--count-to")
    kept = doctor.with_options([COUNTING, RAISING], parser)
    assert kept[1] is RAISING and isinstance(kept[0], doctor.FailedSection)
    assert kept[0].reason.startswith("cannot add its options (ArgumentError")
