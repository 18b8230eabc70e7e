"""The first-run verdicts: which fast ops passed on this GPU, kept as small JSON files.

A verdict says, for one key, which fast ops passed the check made in a child process
(first_run.py) and why the others failed. The key is what a kernel's fate depends on: the
device (GPU name and compute capability; "cpu" when the tests check through Triton's
interpreter), the versions of the driver, CUDA runtime, torch, Triton and edge-vlm, and the
model's shape family (its decoder config without the layer count, dtype, which modules are int4
with which group size, the KV-cache kind, whether Triton is allowed).

Files live in `<cache>/first-run/<digest>.json`, `<cache>` being edge-vlm's cache folder
(`$EDGE_VLM_CACHE`, default ~/.cache/edge-vlm, as for the GGUF exports). The digest covers the
device and the family only, so a verdict made under other versions has the same name: it is
read, found stale, ignored and rewritten. A file that does not parse as a verdict is ignored the
same way. Writes go to a temporary name in the same folder, then `os.replace`: two processes
checking at once each leave a whole file, never a mixture.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cache import cache_root

FORMAT = 1  # bump when a verdict's meaning changes (e.g. an op is added to the check)
FOLDER = "first-run"


@dataclass
class OpResult:
    passed: bool
    reason: str = ""
    seconds: float = 0.0


@dataclass
class Verdict:
    """The outcome of the first-run check for `key`. `complete`: a child ran to its end (only a
    complete verdict is written; one whose child died before its first check is not)."""
    key: dict
    ops: dict[str, OpResult] = field(default_factory=dict)
    complete: bool = True
    children: int = 0
    seconds: float = 0.0  # wall time of all the child processes together
    checked_at: str = ""
    failure: str = ""  # why the check could not finish (an incomplete verdict, never written)

    def passed(self, op: str) -> bool:
        result = self.ops.get(op)
        return result is not None and result.passed

    def failures(self) -> dict[str, str]:
        return {op: r.reason for op, r in self.ops.items() if not r.passed}

    def to_dict(self) -> dict:
        return {"format": FORMAT, "key": self.key, "checked_at": self.checked_at, "children": self.children,
                "seconds": round(self.seconds, 3),
                "ops": {op: {"passed": r.passed, "reason": r.reason, "seconds": round(r.seconds, 3)}
                        for op, r in self.ops.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Verdict":
        """Raises (KeyError, TypeError, ValueError) on anything that is not a verdict of this format."""
        if d["format"] != FORMAT or not isinstance(d["key"], dict) or not isinstance(d["ops"], dict):
            raise ValueError("not a verdict of this format")
        ops = {}
        for op, r in d["ops"].items():
            if not isinstance(r["passed"], bool) or not isinstance(r["reason"], str):
                raise TypeError(f"bad entry for {op}")
            ops[str(op)] = OpResult(r["passed"], r["reason"], float(r.get("seconds", 0.0)))
        return cls(d["key"], ops, True, int(d.get("children", 0)), float(d.get("seconds", 0.0)),
                   str(d.get("checked_at", "")))


# ---------------------------------------------------------------- the key

def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_identity(device: torch.device) -> dict:
    """What the device is: its name and compute capability (CUDA), or the CPU's vector level."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}"}
    capability = None
    with contextlib.suppress(Exception):
        capability = torch.backends.cpu.get_cpu_capability()
    return {"type": device.type, "name": "Triton interpreter", "capability": capability}


def _cuda_driver() -> int | None:
    with contextlib.suppress(Exception):  # a private call: absent on some builds
        return int(torch._C._cuda_getDriverVersion())
    return None


def versions(device_type: str) -> dict:
    """The software a kernel's fate depends on, as installed now."""
    triton = _version("triton") or _version("triton-windows")
    return {"driver": _cuda_driver() if device_type == "cuda" else None, "cuda": torch.version.cuda,
            "torch": torch.__version__, "triton": triton, "edge_vlm": _version("edge-vlm"),
            "llama_cpp": _version("llama_cpp_python")}


def make_key(device: torch.device, family: dict) -> dict:
    return {"device": device_identity(device), "versions": versions(device.type), "family": family}


def folder() -> Path:
    return cache_root() / FOLDER


def path_for(key: dict) -> Path:
    """The file of `key`: named by device and family, so other versions land on the same name."""
    named = json.dumps({"device": key["device"], "family": key["family"]}, sort_keys=True)
    return folder() / f"{hashlib.sha256(named.encode()).hexdigest()[:16]}.json"


# ---------------------------------------------------------------- reading and writing

def read(path: Path, key: dict) -> Verdict | None:
    """The verdict in `path` if it is one, whole, for exactly `key`; None otherwise (missing,
    corrupt, another format, or made under other versions: the caller checks again)."""
    try:
        verdict = Verdict.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return verdict if verdict.key == json.loads(json.dumps(key)) else None


def read_any(path: Path) -> Verdict | None:
    """The verdict in `path` whatever its key (for `edge-vlm doctor`); None when it is not one."""
    try:
        return Verdict.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write(path: Path, verdict: Verdict) -> None:
    """Write `verdict` whole or not at all: a private temporary name, then an atomic rename.
    Raises OSError when the folder cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(verdict.to_dict(), indent=1, sort_keys=True))
        for attempt in range(5):
            try:
                os.replace(tmp, path)
                return
            except PermissionError:  # Windows: a reader has the target open; it closes in ms
                if attempt == 4:
                    raise
                time.sleep(0.05)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def discard(path: Path | None = None) -> int:
    """Delete the verdict at `path`, or every verdict when None; returns how many were deleted."""
    paths = [path] if path is not None else sorted(folder().glob("*.json"))
    deleted = 0
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            deleted += 1
    return deleted


def all_verdicts() -> list[tuple[Path, Verdict | None]]:
    """Every file in the verdict folder with its verdict (None: not a verdict of this format)."""
    return [(p, read_any(p)) for p in sorted(folder().glob("*.json"))]


def stale(verdict: Verdict) -> bool:
    """Whether `verdict` was made under other versions than the ones installed now."""
    device_type = verdict.key.get("device", {}).get("type", "cuda")
    return verdict.key.get("versions") != json.loads(json.dumps(versions(device_type)))
