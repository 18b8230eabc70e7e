"""Static checks of the jetson/ files, which cannot run here (no Jetson, no docker daemon):
the Dockerfile against hadolint's main rules, the setup script with bash -n and shellcheck,
the systemd unit with systemd-analyze, and the README's memory table against the code."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

JETSON = Path(__file__).resolve().parents[2] / "jetson"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in (JETSON / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "a continuation line runs off the end of the Dockerfile"
    return out


def test_dockerfile_follows_hadolint_rules():
    ins = dockerfile_instructions()
    args = dict(re.match(r"(\w+)=(\S+)", a).groups() for i, a in ins if i == "ARG" and "=" in a)
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) == 1
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], froms[0])
    assert re.fullmatch(r"nvcr\.io/nvidia/l4t-jetpack:r36\.\d+\.\d+", image)  # DL3006/DL3007: a pinned tag
    shell = [a for i, a in ins if i == "SHELL"]
    assert shell and "pipefail" in shell[0]  # DL4006
    runs = [a for i, a in ins if i == "RUN"]
    for run in runs:
        assert "sudo " not in run  # DL3004
        assert not re.search(r"(^|&&\s*)cd ", run)  # DL3003: WORKDIR instead
        assert not re.search(r"(^|\s)apt (install|update)", run)  # DL3027: apt-get in scripts
        if "apt-get install" in run:
            assert "apt-get update" in run.split("apt-get install")[0]  # DL3009: same layer as update
            assert " -y " in run and "--no-install-recommends" in run  # DL3014, DL3015
            assert run.rstrip().endswith("rm -rf /var/lib/apt/lists/*")  # DL3009
        for pip in re.findall(r"pip3? install ([^&]*)", run):
            assert "--no-cache-dir" in pip  # DL3042
            named = [w.strip('"') for w in pip.split() if not w.startswith("-") and not w.startswith('"$')]
            named = [w for w in named if w != "." and "index" not in w]
            assert all("==" in w for w in named), named  # DL3013: pinned versions
            if "torch" in pip:
                assert "--index-url" in pip  # Jetson's CUDA wheels, not PyPI's
    assert not [a for i, a in ins if i == "ADD"]  # DL3020: COPY for local files
    for instr in ("ENTRYPOINT", "CMD"):
        values = [a for i, a in ins if i == instr]
        assert len(values) == 1 and values[0].startswith("["), instr  # DL3025: exec (JSON) form
    copied = [a.split()[0] for i, a in ins if i == "COPY"]
    root = JETSON.parent
    assert all((root / c).exists() for c in copied), copied  # every COPY source is in the repository


def test_dockerfile_installs_what_the_camera_needs():
    text = (JETSON / "Dockerfile").read_text()
    for pkg in ("python3-opencv", "gstreamer1.0-plugins-good", "gstreamer1.0-libav", "gstreamer1.0-rtsp"):
        assert pkg in text
    assert "pip3 uninstall -y opencv-python-headless" in text  # or cv2 would lack GStreamer


def test_setup_script_syntax_and_shellcheck():
    script = JETSON / "setup.sh"
    assert script.stat().st_mode & 0o111, "setup.sh must be executable"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck); bash -n passed")
    result = subprocess.run(["shellcheck", "-S", "style", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_setup_script_refuses_to_run_off_a_jetson_or_without_root():
    # Safe only off a Jetson: it stops before touching anything (not root, or no /etc/nv_tegra_release).
    if Path("/etc/nv_tegra_release").exists():
        pytest.skip("on a real Jetson (as root) this would install; not run by the test suite")
    result = subprocess.run(["bash", str(JETSON / "setup.sh")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "run as root" in result.stderr or "not a Jetson" in result.stderr
    bad = subprocess.run(["bash", str(JETSON / "setup.sh"), "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown option" in bad.stderr


def unit_sections() -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in (JETSON / "edge-vlm-camera.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current[key] = value
    return sections


def test_systemd_unit_runs_the_camera_and_stops_cleanly(tmp_path):
    unit = unit_sections()
    svc = unit["Service"]
    exec_start = svc["ExecStart"].split()
    assert exec_start[0] == "/opt/edge-vlm/venv/bin/edge-vlm" and exec_start[1] == "camera"  # setup.sh's venv
    for flag in ("--model", "--source", "--prompt"):
        value = exec_start[exec_start.index(flag) + 1]
        assert value.startswith("${") and value.endswith("}")  # ${VAR}: one argument even with spaces
    env = dict(line.split("=", 1) for line in (JETSON / "camera.env").read_text().splitlines()
               if line and not line.startswith("#"))
    assert {"EDGE_VLM_MODEL", "EDGE_VLM_SOURCE", "EDGE_VLM_PROMPT", "EDGE_VLM_ARGS"} <= set(env)
    assert svc["KillSignal"] == "SIGTERM" and int(svc["TimeoutStopSec"]) >= 10
    assert svc["Restart"] == "on-failure" and unit["Install"]["WantedBy"] == "multi-user.target"
    assert svc["StandardOutput"].startswith("append:")  # JSON lines kept across restarts
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not available; static checks passed")
    # verify needs ExecStart to exist: point it at /bin/true in a copy, keep everything else
    copy = tmp_path / "edge-vlm-camera.service"
    copy.write_text((JETSON / "edge-vlm-camera.service").read_text().replace(exec_start[0], "/bin/true"))
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines() if "edge-vlm-camera" in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_readme_memory_table_is_what_memory_estimate_gives():
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_table", JETSON / "memory_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.table(4096)
    assert table in (JETSON / "README.md").read_text(), "regenerate: python jetson/memory_table.py"
    rows = {(name, label): gb for name, label, gb in module.rows(4096)}
    # int4 linears shrink the weights by more than half; fp16 VILA1.5-3B is ~3.2B params x 2 bytes + KV
    assert rows[("VILA1.5-3B", "int4 AWQ")] < rows[("VILA1.5-3B", "fp16")] / 1.8
    assert 7.0 < rows[("VILA1.5-3B", "fp16")] < 8.0
    # Nemovision's 256k vocabulary: int8 embeddings + int4 lm_head save ~2 GB of its two 1.57 GB tables
    big = "int4 AWQ + int4 lm_head + int8 embeddings"
    assert rows[("Nemovision-4B", "int4 AWQ")] - rows[("Nemovision-4B", big)] > 1.5
    assert ("VILA1.5-3B", big) not in rows  # 32k vocabulary: not worth it, not listed
    # an int8 KV cache halves the fp16 cache: 32 layers x 8 kv heads x 4096 x 2 x (2 x 128 - 132) bytes
    saved = rows[("Nemovision-4B", big)] - rows[("Nemovision-4B", "the same + int8 KV cache")]
    assert saved == pytest.approx(2 * 32 * 8 * 4096 * (256 - 132) / 1e9)
