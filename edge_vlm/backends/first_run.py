"""The first-run check: every fast op tried once in a child process before this process uses it.

The load-time self-check (gpu_path.py, selfcheck.py) catches a kernel that gives wrong numbers
or raises. It cannot catch what edge users report most: an illegal memory access or a kernel
image missing for the architecture leaves the CUDA context unusable, and a hang never returns;
either would end the user's chat. So the first time a fast GPU path would be used for a key
(the device, the driver / CUDA / torch / Triton / edge-vlm versions, the model's shape family:
verdicts.py), every check runs first in a child process, on a one-layer stand-in of the model's
shape family (stand_in.py) on the same device:

- `gate_for` (parent): a verdict already kept for exactly this key is used as it is (no child);
  otherwise a child is started (`python -c`, never `multiprocessing`: spawning would re-run the
  user's own script), given the family on stdin, and reports on stdout a line before and after
  each check (`ChildGate`). Each wait for the child's next line has a limit (`LIMITS`).
- A check whose child dies during it (a crash: a signal or an exit status), that hangs past the
  limit (the child is killed) or that raises (after a CUDA error the context may be unusable:
  the child stops) fails with that reason, and a fresh child goes on with the ops not known yet,
  that one off. A check that gives wrong values fails and the same child goes on.
- The verdict (each op's outcome) is written as JSON in the cache folder (verdicts.write);
  when something is off, one `FirstRunWarning` line names each op, why, and what runs instead.
- The parent converts its own model through the returned `VerdictGate`: an op the child did not
  pass is off without being touched; an op it passed runs its in-process self-check on the
  model's own layers (the second guard: shapes the child did not see).

A child that cannot even reach its first check (e.g. the device cannot be opened) leaves every
op off for this load; that verdict is not kept, so the next load tries again.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import gpu_path, stand_in, verdicts
from .gpu_path import FALLBACK_TEXT, OPS, SelfCheckWarning
from .selfcheck import Check, describe
from .verdicts import OpResult, Verdict


@dataclass(frozen=True)
class Limits:
    """How long the parent waits for the child's next line. Not measured on a GPU (none has run
    these kernels in this project): chosen to cover a slow board's Python and torch start-up and
    a first Triton compile of one op's kernels."""
    startup_s: float = 180.0  # until the stand-in is built
    check_s: float = 180.0  # from one line to the next once it is


LIMITS = Limits()
CHILD_ENTRY = "edge_vlm.backends.first_run:child_main"  # module:function the child runs (tests run a faulty one)
PREFIX = "@edge-vlm-first-run "  # marks the child's report lines among whatever else it prints
STOPPED = 3  # the child's exit status after a check raised
FAILED = 4  # ... after an error outside any check


class FirstRunWarning(SelfCheckWarning):
    """The first-run check turned fast ops off (or could not finish); the model runs on the next paths."""


# ---------------------------------------------------------------- the parent's side

class VerdictGate:
    """The parent's gate: only what the child passed runs its check here; the rest is off."""

    def __init__(self, verdict: Verdict, summary: dict):
        self.verdict, self._summary = verdict, summary

    def decided(self, op: str) -> Check | None:
        if self.verdict.passed(op):
            return None  # the second guard: its in-process check on this model's own layers
        result = self.verdict.ops.get(op)
        reason = result.reason if result is not None else f"not checked ({self.verdict.failure or 'not reached'})"
        return Check(op, False, f"first-run check: {reason}")

    def ran(self, check: Check) -> None:
        pass

    def summary(self) -> dict:
        return self._summary


def needs_check(family: dict) -> bool:
    """Whether any fast op would be used: the Triton kernels, or int4 layers for torch's int4 matmul."""
    return bool(family["triton"] or family["int4"])


def gate_for(family: dict, device: torch.device, recheck: bool = False, limits: Limits | None = None) -> VerdictGate:
    """The verdict for `family` on `device`: read from the cache folder, or made now by child
    processes (and kept); `recheck` discards a kept one first. Warns once when ops are off."""
    start = time.perf_counter()
    key = verdicts.make_key(device, family)
    path = verdicts.path_for(key)
    if recheck:
        verdicts.discard(path)
    verdict = verdicts.read(path, key)
    cached, kept = verdict is not None, None
    if verdict is None:
        verdict = check_in_child(key, device, limits or LIMITS)
        if verdict.complete:
            try:
                verdicts.write(path, verdict)
                kept = True
            except OSError as e:
                kept = False
                warnings.warn(f"edge-vlm first-run check: could not keep the verdict in {path} ({describe(e)}); "
                              "the check runs again on the next load", FirstRunWarning, stacklevel=3)
    _warn(verdict, path, cached, kept)
    summary = {"file": str(path), "cached": cached, "complete": verdict.complete, "children": verdict.children,
               "child_seconds": round(verdict.seconds, 3), "seconds": round(time.perf_counter() - start, 3),
               "failed": verdict.failures(), "family": family}
    return VerdictGate(verdict, summary)


def _warn(verdict: Verdict, path: Path, cached: bool, kept: bool | None) -> None:
    failures = verdict.failures()
    if not failures and verdict.complete:
        return
    if not verdict.complete:
        where = f"could not finish ({verdict.failure}); the check runs again on the next load"
    elif cached:
        where = f"verdict kept in {path}; `edge-vlm doctor --recheck` checks again"
    else:
        where = f"verdict {'kept in ' + str(path) if kept else 'not kept'}; `edge-vlm doctor --recheck` checks again"
    off = "; ".join(f"{op} ({reason}): {FALLBACK_TEXT[op]}" for op, reason in failures.items())
    if not verdict.complete:
        off = (off + "; " if off else "") + "every op not passed is off"
    warnings.warn(f"edge-vlm first-run check{' (cached)' if cached else ''} turned off {off} [{where}]",
                  FirstRunWarning, stacklevel=4)


@dataclass
class ChildOutcome:
    """What one child process reported: its ops' results, and how it ended."""
    results: dict[str, OpResult]
    finished: bool = False  # it ran to its end
    in_flight: str | None = None  # the op it was checking when it died or hung
    failure: str = ""  # why it ended early (empty when it stopped by itself after a check raised)


def check_in_child(key: dict, device: torch.device, limits: Limits) -> Verdict:
    """Child after child until one finishes: each failure found (crash, hang, raise) is known to the next."""
    start, known, children = time.perf_counter(), {}, 0
    verdict_failure = ""
    for _ in range(len(OPS) + 1):  # each restart follows a newly failed op: bounded by the op count
        children += 1
        request = {"family": key["family"], "device": str(device), "known": {op: asdict(r) for op, r in known.items()}}
        outcome = run_child(request, limits)
        known.update(outcome.results)
        if outcome.finished:
            break
        if outcome.in_flight is not None:
            known[outcome.in_flight] = OpResult(False, outcome.failure)
        elif outcome.failure:
            verdict_failure = outcome.failure
            break
    else:
        verdict_failure = "too many child processes"
    return Verdict(key, known, complete=not verdict_failure, children=children,
                   seconds=time.perf_counter() - start, checked_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   failure=verdict_failure)


def child_command() -> list[str]:
    return [sys.executable, "-c", "import importlib, sys; m, f = sys.argv[1].split(':'); "
            "getattr(importlib.import_module(m), f)()", CHILD_ENTRY]


def _child_env() -> dict:
    """This environment, with the folder edge_vlm was imported from first on the path."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1"}


def run_child(request: dict, limits: Limits) -> ChildOutcome:
    """One child process: send `request`, follow its report lines under the time limits."""
    outcome = ChildOutcome({})
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(child_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                env=_child_env(), text=True, encoding="utf-8", errors="replace",
                                start_new_session=True)  # POSIX: its own group, so a kill takes its helpers too
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(target=_read_reports, args=(proc.stdout, lines), daemon=True)
        reader.start()
        try:
            with contextlib.suppress(BrokenPipeError, OSError):  # a child that died at once: found below
                proc.stdin.write(json.dumps(request))
                proc.stdin.close()
            ready = False
            while True:
                limit = limits.check_s if ready else limits.startup_s
                try:
                    event = lines.get(timeout=limit)
                except queue.Empty:
                    _kill(proc)
                    outcome.failure = f"hung: no answer within {limit:g} s (the child process was killed)"
                    return _placed(outcome, ready)
                if event is None:  # the child's stdout closed: it ended
                    code = _wait(proc)
                    if code == STOPPED and outcome.in_flight is None:
                        return outcome  # it stopped after a check raised, as it should
                    outcome.failure = outcome.failure or _ended(code, _last_line(stderr))
                    return _placed(outcome, ready)
                kind = event.get("event")
                if kind == "ready":
                    ready = True
                elif kind == "start":
                    outcome.in_flight = event["op"]
                elif kind == "done":
                    outcome.results[event["op"]] = OpResult(bool(event["passed"]), str(event["reason"]),
                                                            float(event["seconds"]))
                    outcome.in_flight = None
                elif kind == "error":
                    outcome.failure = str(event["reason"])
                elif kind == "finished":
                    outcome.finished = True
                    _wait(proc)
                    return outcome
        finally:
            if proc.poll() is None:
                _kill(proc)
            reader.join(timeout=5)
            if not reader.is_alive():  # else a grandchild holds the pipe open: leave it to the thread
                proc.stdout.close()


def _placed(outcome: ChildOutcome, ready: bool) -> ChildOutcome:
    """Name where a child that ended early was: in a check, before its first, or between two."""
    if outcome.in_flight is None:
        where = "outside a check" if ready else "before its first check"
        outcome.failure = f"the child process failed {where}: {outcome.failure}"
    return outcome


def _read_reports(stream, lines: queue.Queue) -> None:
    """Put each report line of the child (parsed) on `lines`, then None when its stdout closes."""
    try:
        for line in stream:
            if line.startswith(PREFIX):
                with contextlib.suppress(ValueError):
                    lines.put(json.loads(line[len(PREFIX):]))
    finally:
        lines.put(None)


def _kill(proc: subprocess.Popen) -> None:
    """Kill the child and, on POSIX, its process group (e.g. a compiler it started that hangs)."""
    with contextlib.suppress(OSError):
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    _wait(proc)


def _wait(proc: subprocess.Popen) -> int | None:
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a child stuck in the driver: leave it, do not hang the load
        return None


def _ended(code: int | None, last_line: str) -> str:
    if code is None:
        what = "the child process did not end"
    elif code < 0:
        try:
            what = f"crashed the child process ({signal.Signals(-code).name})"
        except ValueError:
            what = f"crashed the child process (signal {-code})"
    else:
        what = f"ended the child process (exit status {code})"
    return f"{what}: {last_line}" if last_line else what


def _last_line(stderr) -> str:
    """The child's last non-empty stderr line (e.g. a driver's message), shortened."""
    with contextlib.suppress(OSError):
        stderr.seek(0)
        lines = [x.strip() for x in stderr.read().decode("utf-8", "replace").splitlines() if x.strip()]
        return lines[-1][:160] if lines else ""
    return ""


# ---------------------------------------------------------------- the child's side

class ChildGate:
    """The child's gate: ops known from an earlier child are decided; every other check runs
    here and is reported before and after. After a check that raised the child stops."""

    def __init__(self, known: dict[str, dict], out):
        self.known = {op: OpResult(**r) for op, r in known.items()}
        self.out = out

    def decided(self, op: str) -> Check | None:
        if op in self.known:
            r = self.known[op]
            return Check(op, r.passed, r.reason, r.seconds)
        self.emit(event="start", op=op)
        return None

    def ran(self, check: Check) -> None:
        self.emit(event="done", op=check.op, passed=check.passed, reason=check.reason, seconds=check.seconds)
        if check.raised:  # a CUDA error may have left this context unusable: a fresh child goes on
            os._exit(STOPPED)

    def summary(self) -> None:
        return None

    def emit(self, **event) -> None:
        self.out.write(PREFIX + json.dumps(event) + "\n")
        self.out.flush()


def child_main() -> None:
    """The child process: the request on stdin, a report line per event on stdout. It ends with
    os._exit, so no interpreter teardown (which can crash after a CUDA error) follows the report."""
    out = sys.stdout
    request = json.loads(sys.stdin.read())
    gate = ChildGate(request["known"], out)
    warnings.simplefilter("ignore", SelfCheckWarning)  # the parent reports; the outcome goes on stdout
    try:
        device = torch.device(request["device"])
        llm = stand_in.build(request["family"], device)
        gate.emit(event="ready")
        gpu_path.convert(llm, triton=request["family"]["triton"], gate=gate,
                         kv_cache_int8=request["family"]["kv_cache_int8"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - outside any check: reported, then the parent decides
        gate.emit(event="error", reason=describe(e))
        os._exit(FAILED)
    gate.emit(event="finished")
    os._exit(0)
