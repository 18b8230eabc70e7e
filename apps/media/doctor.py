"""The OpenCV and cameras part of `edge-vlm doctor`: whether OpenCV imports, whether it was built
with GStreamer (a Jetson's CSI cameras and hardware decoding need it), and which camera indices
open and give a frame.

A doctor section (edge_vlm/cli/doctor.py's `DoctorSection`), declared in pyproject.toml's
`edge_vlm.doctor` entry points: the runtime reports on cameras without knowing the apps exist.
Only the standard library is imported at the top, since `edge-vlm` loads the section for every
command it parses; OpenCV is imported where it is probed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

CAMERA_PROBE_SECONDS = 3.0  # per index: opening a missing camera can block on some drivers

_CAMERA_PROBE = r"""
import json, sys
import cv2
for i in range(int(sys.argv[1])):
    cap = cv2.VideoCapture(i)
    opened, frame = cap.isOpened(), None
    if opened:
        ok, image = cap.read()
        frame = list(image.shape[1::-1]) if ok else None
    cap.release()
    print(json.dumps({"index": i, "opened": opened, "frame": frame}), flush=True)
"""


class OpenCVSection:
    """OpenCV, its GStreamer support and the cameras it opens (`--cameras N` indices, 0 to skip)."""

    name = "opencv"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--cameras", type=int, default=4, metavar="N",
                            help="camera indices to try (default 4: 0-3; 0 tries none)")

    def collect(self, options: argparse.Namespace, progress: Callable[[str], None]) -> dict:
        progress(f"OpenCV and cameras 0-{options.cameras - 1}" if options.cameras > 0 else "OpenCV")
        return opencv_info(options.cameras)

    def lines(self, data: dict) -> list[str]:
        if not data["installed"]:
            return ["  OpenCV      not installed"]
        cams = data["cameras"]
        opened = ", ".join(f"{c['index']}" + (f" ({c['frame'][0]}x{c['frame'][1]})" if c["frame"] else " (no frame)")
                           for c in cams["opened"]) or "none"
        note = f"; {cams['note']}" if cams.get("note") else ""
        gst = "yes" if data["gstreamer"] else "no"
        return [f"  OpenCV      {data['version']}, GStreamer {gst}; cameras opened: {opened} "
                f"(of {cams['probed']} tried{note})"]


section = OpenCVSection()


def opencv_info(cameras: int) -> dict:
    try:
        # probed: the doctor reports whether it imports
        import cv2
    except Exception as e:  # noqa: BLE001 - absent or broken: either way not usable
        return {"installed": False, "reason": type(e).__name__}
    build = cv2.getBuildInformation()
    line = next((x for x in build.splitlines() if x.strip().startswith("GStreamer:")), "")
    gst = line.split(":", 1)[1].strip() if line else "unknown"
    return {"installed": True, "version": cv2.__version__, "gstreamer": gst.upper().startswith("YES"),
            "gstreamer_detail": gst, "cameras": probe_cameras(cameras)}


def probe_cameras(count: int, seconds_each: float = CAMERA_PROBE_SECONDS) -> dict:
    """Try camera indices 0..count-1 in a child process that is killed if a driver blocks."""
    if count <= 0:
        return {"probed": 0, "opened": [], "note": "not probed"}
    if no_video_devices():
        return {"probed": 0, "opened": [], "note": "no /dev/video* device"}
    env = {**os.environ, "OPENCV_LOG_LEVEL": "ERROR", "OPENCV_VIDEOIO_DEBUG": "0"}
    try:
        done = subprocess.run([sys.executable, "-c", _CAMERA_PROBE, str(count)], capture_output=True, text=True,
                              timeout=seconds_each * count + 5, env=env)
        out, note = done.stdout, None if done.returncode == 0 else f"probe exited with status {done.returncode}"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        note = "probe timed out (a camera driver blocked)"
    results = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    return {"probed": len(results), "opened": [r for r in results if r["opened"]], "note": note}


def no_video_devices() -> bool:
    """Linux lists its cameras as /dev/video*: none there means none to open (other OSes: try)."""
    return sys.platform.startswith("linux") and not list(Path("/dev").glob("video*"))
