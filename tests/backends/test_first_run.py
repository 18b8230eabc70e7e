"""The first-run check in a child process, on CPU: the child runs the Triton kernels through the
interpreter, on a stand-in of the test model's shape family, exactly as it would on a GPU.

Faults are injected into the child's own kernels (`faulty_child_main` is the child these tests
start, through the real machinery): a kernel that calls os.abort(), one that sleeps past the
limit, one that raises a CUDA-like error, one that returns wrong values, and two at once. Each
must give the reference model's greedy tokens in the parent, one warning naming what was turned
off and why, a verdict file saying the same, and a parent that never launched the failed kernel;
a second load reads the file and starts no child process.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")  # the kernels need it (the `gpu`/`test` extras)

from edge_vlm.backends import FirstRunWarning, SelfCheckWarning, make_engine, optimize_for_device  # noqa: E402
from edge_vlm.backends import first_run, verdicts  # noqa: E402
from edge_vlm.backends.stand_in import shape_family  # noqa: E402
from edge_vlm.backends.triton import decode_attention, norms, rotary_kv, w4a16  # noqa: E402
from edge_vlm.backends.triton.cuda_graph import CUDAGraphEngine  # noqa: E402
from edge_vlm.backends.torch_engine import TorchEngine
from tests.backends.test_selfcheck import _ids, _model, greedy  # noqa: E402

FAULTS = "EDGE_VLM_TEST_FAULTS"  # "op=kind,op=kind": the faults faulty_child_main injects
KERNELS = {  # op -> (module, kernel attribute, index of the output argument)
    "w4a16_gemv": (w4a16, "_w4a16_gemv", 5), "w4a16_gemm": (w4a16, "_w4a16_gemm", 5),
    "fused_norm": (norms, "_add_norm", 4), "rotary_kv": (rotary_kv, "_rotary_kv", 6),
    "decode_attention": (decode_attention, "_decode_attention", 8)}
CHECK_SECONDS = 10.0  # the tests' limit per check (the slowest here takes ~1.5 s through the interpreter)
CUDA_ERROR = "CUDA error: an illegal memory access was encountered"


class ChildFault:
    """A launcher.Kernel stand-in whose launches fail one way: "abort" (the process dies of
    SIGABRT), "hang" (sleeps for an hour), "cuda_error" (raises as torch does after an illegal
    memory access), "wrong" (the real result shifted by 1% of its largest value)."""

    def __init__(self, real, fault: str, out: int):
        self.real, self.fault, self.out = real, fault, out

    def on(self, device):
        real, fault, out = self.real.on(device), self.fault, self.out

        class Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    if fault == "abort":
                        os.abort()
                    if fault == "hang":
                        time.sleep(3600)
                    if fault == "cuda_error":
                        raise RuntimeError(f"{CUDA_ERROR}\nCUDA kernel errors might be asynchronously reported")
                    real[grid](*args, **kwargs)
                    y = args[out]
                    y.add_(0.01 * y.float().abs().max().to(y.dtype))
                return launch

        return Grid()


def faulty_child_main() -> None:
    """The child process of these tests: the real `child_main`, with the kernels named in
    $EDGE_VLM_TEST_FAULTS made faulty first ("startup=abort" dies before any check)."""
    for item in filter(None, os.environ.get(FAULTS, "").split(",")):
        op, fault = item.split("=")
        if op == "startup":
            os.abort()
        module, name, out = KERNELS[op]
        setattr(module, name, ChildFault(getattr(module, name), fault, out))
    first_run.child_main()


class Launches:
    """Counts the launches of one kernel in this (the parent) process, passing them on."""

    def __init__(self, real):
        self.real, self.count = real, 0

    def on(self, device):
        real, spy = self.real.on(device), self

        class Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    spy.count += 1
                    return real[grid](*args, **kwargs)
                return launch

        return Grid()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _model(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def reference_tokens(llama):
    return greedy(llama, _ids(llama), TorchEngine(llama, 16))  # the plain torch model, dequantize + matmul


class Children(list):
    """The child processes the first-run check started (their commands); `forbidden`: starting
    one fails the test."""
    forbidden = False


@pytest.fixture
def children(tmp_path, monkeypatch):
    """A fresh cache folder, the faulty child, short limits; counts the child processes started."""
    monkeypatch.setenv("EDGE_VLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(first_run, "CHILD_ENTRY", "tests.backends.test_first_run:faulty_child_main")
    monkeypatch.setattr(first_run, "LIMITS", first_run.Limits(startup_s=120.0, check_s=CHECK_SECONDS))
    started, real = Children(), subprocess.Popen

    def popen(cmd, *args, **kwargs):
        if started.forbidden:
            raise AssertionError(f"a child process was started: {cmd}")
        started.append(cmd)
        return real(cmd, *args, **kwargs)

    monkeypatch.setattr(first_run.subprocess, "Popen", popen)
    return started


def _load(llm, **kw):
    """optimize_for_device with the first-run check on a copy of `llm`: (copy, report, warnings)."""
    fast = copy.deepcopy(llm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = optimize_for_device(fast, backend="triton", child_check=True, **kw).report
    return fast, report, caught


def _tokens(fast, report):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = greedy(fast, _ids(fast), report=report)
    assert caught == []
    return tokens


def _verdict_file(report) -> dict:
    return json.loads(Path(report.first_run["file"]).read_text())


def _first_run_warning(caught, off: dict[str, str], cached: bool) -> str:
    """Exactly one warning, a FirstRunWarning naming each op turned off with its reason."""
    texts = [str(w.message) for w in caught]
    assert len(caught) == 1 and issubclass(caught[0].category, FirstRunWarning), texts
    text = texts[0]
    assert text.startswith("edge-vlm first-run check (cached) turned off " if cached else
                           "edge-vlm first-run check turned off "), text
    for op, reason in off.items():
        assert f"{op} (" in text and reason in text, text
    assert "\n" not in text and "edge-vlm doctor --recheck" in text
    return text


FAULT_CASES = {
    "abort": ({"w4a16_gemv": "abort"}, {"w4a16_gemv": "crashed the child process (SIGABRT)"}, 2),
    "hang": ({"decode_attention": "hang"}, {"decode_attention": f"hung: no answer within {CHECK_SECONDS:g} s"}, 2),
    "cuda_error": ({"w4a16_gemm": "cuda_error"}, {"w4a16_gemm": f"RuntimeError: {CUDA_ERROR}"}, 2),
    "wrong": ({"rotary_kv": "wrong"}, {"rotary_kv": "mismatch: relative error"}, 1),
    "double": ({"w4a16_gemv": "abort", "decode_attention": "hang"},
               {"w4a16_gemv": "crashed the child process (SIGABRT)",
                "decode_attention": f"hung: no answer within {CHECK_SECONDS:g} s"}, 3),
}


# the hang cases wait out the child's time limit: in the full run, not the fast tier
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in ("hang", "double") else c
                                  for c in FAULT_CASES])
@pytest.mark.slow  # child processes: the whole suite (CI) runs it, the edit loop's tier does not
def test_a_fault_in_the_child_turns_off_exactly_the_failing_ops(llama, reference_tokens, children, monkeypatch, case):
    faults, off, child_count = FAULT_CASES[case]
    monkeypatch.setenv(FAULTS, ",".join(f"{op}={kind}" for op, kind in faults.items()))
    spies = {}
    for op in faults:  # this process's copies of the failed kernels: never to be launched here
        module, name, _ = KERNELS[op]
        spies[op] = Launches(getattr(module, name))
        monkeypatch.setattr(module, name, spies[op])

    fast, report, caught = _load(llama)
    _first_run_warning(caught, off, cached=False)
    assert len(children) == child_count  # a crash, hang or raise: a fresh child goes on; a mismatch: the same
    linear_off = {"w4a16_gemv", "w4a16_gemm"} & set(faults)
    decode_off = {"rotary_kv", "decode_attention"} & set(faults)
    assert report.linear == ("torch_int4" if linear_off else "triton")
    assert report.fused_decode == (not decode_off) and report.cuda_graph == (not decode_off)
    assert type(make_engine(fast, 16, report=report)) is (TorchEngine if decode_off else CUDAGraphEngine)
    assert _tokens(fast, report) == reference_tokens
    assert all(spy.count == 0 for spy in spies.values())

    saved = _verdict_file(report)
    failed = {op: r["reason"] for op, r in saved["ops"].items() if not r["passed"]}
    assert failed.keys() == off.keys() and all(off[op] in failed[op] for op in off), failed
    assert saved["children"] == child_count and saved["format"] == verdicts.FORMAT
    assert saved["key"]["family"] == shape_family(llama, True)
    assert saved["key"]["versions"]["torch"] == torch.__version__
    passed = {op for op, r in saved["ops"].items() if r["passed"]}
    assert ("torch_int4" in passed) == bool(linear_off) and ("fused_decode_step" in passed) == (not decode_off)
    checks = {c.op: c for c in report.checks}  # the parent's own: failed ones decided, never run here
    assert all(not checks[op].passed and checks[op].reason.startswith("first-run check: ") for op in off)

    children.forbidden = True  # a second load reads the verdict: no child process
    again, report2, caught = _load(llama)
    _first_run_warning(caught, off, cached=True)
    assert report2.first_run["cached"]
    assert (report2.linear, report2.fused_decode) == (report.linear, report.fused_decode)
    assert _tokens(again, report2) == reference_tokens and all(spy.count == 0 for spy in spies.values())


@pytest.mark.slow  # the whole CUDA path through the interpreter, in a child: ~18 s
def test_all_ops_passing_in_the_child_serve_the_whole_cuda_path(llama, reference_tokens, children, monkeypatch):
    monkeypatch.delenv(FAULTS, raising=False)
    fast, report, caught = _load(llama)
    assert caught == [] and len(children) == 1
    assert (report.linear, report.fused_mlp, report.fused_norm, report.fused_decode, report.cuda_graph) == (
        "triton", True, True, True, True)
    assert report.first_run["failed"] == {} and not report.first_run["cached"]
    saved = _verdict_file(report)
    assert sorted(saved["ops"]) == sorted(["w4a16_gemv", "w4a16_gemm", "epilogue", "fused_norm", "rotary_kv",
                                           "decode_attention", "fused_decode_step", "cuda_graph"])
    assert all(r["passed"] for r in saved["ops"].values())
    # each op the child passed also ran its in-process check here (the second guard)
    assert [c.op for c in report.checks] == ["w4a16_gemv", "w4a16_gemm", "epilogue", "fused_norm", "rotary_kv",
                                             "decode_attention", "fused_decode_step", "cuda_graph"]
    assert all(c.passed and c.seconds > 0 for c in report.checks)
    assert isinstance(make_engine(fast, 16, report=report), CUDAGraphEngine) and _tokens(fast, report) == reference_tokens

    children.forbidden = True
    again, report2, caught = _load(llama)
    assert caught == [] and report2.first_run["cached"] and _tokens(again, report2) == reference_tokens

    children.forbidden = False  # the recheck option discards the verdict: a child runs again
    _, report3, caught = _load(llama, recheck=True)
    assert caught == [] and len(children) == 2 and not report3.first_run["cached"]


@pytest.mark.slow  # a child check and the in-process one: ~9 s
def test_the_in_process_check_still_guards_what_the_child_passed(llama, reference_tokens, children, monkeypatch):
    """A fault only this process sees (a shape the child's stand-in did not have, say): the child
    passed the epilogue, the in-process check here fails it, one SelfCheckWarning."""
    from tests.backends.test_selfcheck import Faulty

    monkeypatch.delenv(FAULTS, raising=False)
    monkeypatch.setattr(w4a16, "_w4a16_gemv", Faulty(w4a16._w4a16_gemv, "nan", 5,
                                                      when=lambda kw: kw["ACT"] == w4a16.ACT_SILU_MUL))
    fast, report, caught = _load(llama)
    assert [str(w.message).split(" failed")[0] for w in caught] == ["edge-vlm self-check: epilogue"]
    assert not issubclass(caught[0].category, FirstRunWarning) and issubclass(caught[0].category, SelfCheckWarning)
    assert report.first_run["failed"] == {} and not report.fused_mlp and report.linear == "triton"
    assert _tokens(fast, report) == reference_tokens


def test_a_child_dying_before_its_first_check_leaves_every_op_off_and_keeps_no_verdict(
        llama, reference_tokens, children, monkeypatch):
    monkeypatch.setenv(FAULTS, "startup=abort")
    fast, report, caught = _load(llama)
    texts = [str(w.message) for w in caught]
    assert len(caught) == 1 and issubclass(caught[0].category, FirstRunWarning), texts
    assert "could not finish (the child process failed before its first check: crashed the child process " \
           "(SIGABRT))" in texts[0] and "runs again on the next load" in texts[0]
    assert report.linear == "reference" and not report.fused_norm and not report.fused_decode  # nothing unchecked runs
    assert report.counts == {} and _tokens(fast, report) == reference_tokens
    assert not Path(report.first_run["file"]).exists() and len(children) == 1
    _load(llama)
    assert len(children) == 2  # not kept: the next load tries again


@pytest.mark.parametrize("content", ["{not json", '{"format": 1, "key": {}}', "[]", ""])
def test_a_corrupt_verdict_file_is_ignored_and_rewritten(llama, children, monkeypatch, content):
    monkeypatch.setenv(FAULTS, "rotary_kv=wrong")
    path = verdicts.path_for(verdicts.make_key(torch.device("cpu"), shape_family(llama, True)))
    path.parent.mkdir(parents=True)
    path.write_text(content)
    _, report, _ = _load(llama)
    assert len(children) == 1 and report.first_run["file"] == str(path)
    saved = json.loads(path.read_text())
    assert not saved["ops"]["rotary_kv"]["passed"] and saved["ops"]["w4a16_gemv"]["passed"]


@pytest.mark.slow  # child processes: the whole suite (CI) runs it, the edit loop's tier does not
def test_a_verdict_made_under_other_versions_is_ignored_and_rewritten(llama, children, monkeypatch):
    """A kept verdict says w4a16_gemv crashed, but under another torch: it is checked again (and
    passes now), and the file is rewritten for the versions installed now."""
    monkeypatch.delenv(FAULTS, raising=False)
    key = verdicts.make_key(torch.device("cpu"), shape_family(llama, True))
    old = json.loads(json.dumps(key))
    old["versions"]["torch"] = "1.13.0"
    path = verdicts.path_for(key)
    assert verdicts.path_for(old) == path  # same device and family: same file
    verdicts.write(path, verdicts.Verdict(old, {"w4a16_gemv": verdicts.OpResult(False, "crashed (SIGSEGV)")}))
    assert verdicts.stale(verdicts.read_any(path))
    _, report, caught = _load(llama)
    assert caught == [] and len(children) == 1 and report.linear == "triton"
    saved = verdicts.read_any(path)
    assert saved.key["versions"]["torch"] == torch.__version__
    assert saved.passed("w4a16_gemv") and not verdicts.stale(saved)


WRITER = """
import sys
from pathlib import Path
from edge_vlm.backends import verdicts
path, tag = Path(sys.argv[1]), sys.argv[2]
print("ready", flush=True)
for i in range(200):
    ops = {"w4a16_gemv": verdicts.OpResult(tag == "a", tag * 4000)}
    verdicts.write(path, verdicts.Verdict({"writer": tag, "i": i}, ops))
"""


def test_two_processes_writing_at_once_never_leave_a_partial_file(tmp_path):
    path = tmp_path / "first-run" / "v.json"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag], stdout=subprocess.PIPE, text=True)
             for tag in "ab"]
    assert all(p.stdout.readline() == "ready\n" for p in procs)
    reads = 0
    while any(p.poll() is None for p in procs):
        if path.exists():
            v = verdicts.read_any(path)
            assert v is not None, path.read_text()[:200]
            assert v.ops["w4a16_gemv"].reason == v.key["writer"] * 4000
            reads += 1
    assert all(p.wait() == 0 for p in procs) and reads > 0
    assert [p.name for p in path.parent.iterdir()] == ["v.json"]  # no temporary file left behind


def test_a_kv_cache_kind_changed_after_loading_is_checked_in_a_child_first(llama, reference_tokens, children,
                                                                           monkeypatch):
    monkeypatch.setenv(FAULTS, "decode_attention=wrong")
    fast, report, _ = _load(llama)
    assert len(children) == 1 and not report.fused_decode and not report.kv_cache_int8
    # an engine over the int8 cache: its kernels are another family, another verdict
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = make_engine(fast, 16, kv_cache_int8=True, report=report)
    assert len(children) == 2 and report.kv_cache_int8 and type(engine) is TorchEngine
    _first_run_warning(caught, {"decode_attention": "mismatch"}, cached=False)
    assert len(list(verdicts.folder().glob("*.json"))) == 2


def test_doctor_lists_the_verdicts_and_recheck_discards_them(llama, children, monkeypatch, capsys):
    from edge_vlm.cli import doctor
    from edge_vlm.cli import main

    monkeypatch.setenv(FAULTS, "rotary_kv=wrong")
    _load(llama)
    (verdicts.folder() / "garbage.json").write_text("{")
    info = doctor.first_run_info()
    good = next(v for v in info["verdicts"] if "error" not in v)
    assert good["family"] == "llama 64x96, 4/2 heads of 16, vocab 384, float32, int4 g32" and not good["stale"]
    assert list(good["failed"]) == ["rotary_kv"] and "w4a16_gemv" in good["passed"]
    text = "\n".join(doctor._first_run_lines(info))
    assert "2 verdict(s) in" in text and "FAILED rotary_kv (mismatch" in text and "garbage.json: not a verdict" in text
    assert main(["doctor", "--recheck", "--cameras", "0"]) == 0
    out = capsys.readouterr().out
    assert "first-run   2 discarded; no verdicts kept in" in out and list(verdicts.folder().glob("*.json")) == []
