"""Where a model's ONNX files live, and exporting them once, on first use.

The folder is keyed by a fingerprint of what the graph depends on (the tower and projector
configs, the checkpoint files' names, sizes and times, torch's version and the export format), so
changed weights or a new exporter give a new export instead of a stale one. Locations:
- a Hugging Face Hub snapshot (…/models--org--name/snapshots/REV): `models--org--name/edge-vlm/REV/`,
  beside the snapshots, so deleting the repo from the Hub cache deletes its exports too;
- a local folder: `FOLDER/.edge-vlm/`, or `~/.cache/edge-vlm/<hash of its path>/` when the folder
  is read-only;
- `EDGE_VLM_CACHE=/some/dir` puts every model's exports under that folder instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from ...cache import cache_root
from .export import FORMAT_VERSION, export_parts, file_name, read_manifest

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def model_cache_dir(model_path) -> Path:
    """The folder edge-vlm keeps derived files of the model at `model_path` in (see the module docstring)."""
    path = Path(model_path).expanduser().resolve()
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    if os.environ.get("EDGE_VLM_CACHE"):
        return cache_root() / digest
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent / "edge-vlm" / path.name
    beside = path / ".edge-vlm"
    return beside if _writable(beside) else cache_root() / digest


def fingerprint(model_path, vision_cfg, projector_cfg, vision_weights: str = "none", tower_only: bool = False) -> str:
    """What the exported graph depends on, hashed: configs, checkpoint file stats, torch, the export format,
    and how the tower's weights were held when it was exported (`vision_weights`: "int8" for
    `load_model(vision_int8=True)`, whose rounded weights the graph then carries)."""
    root = Path(model_path).expanduser().resolve()
    files = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
                   if p.suffix in WEIGHT_SUFFIXES and ".edge-vlm" not in p.parts and p.is_file())
    key = {"vision": dataclasses.asdict(vision_cfg), "projector": dataclasses.asdict(projector_cfg), "files": files,
           "torch": torch.__version__.split("+")[0], "format": FORMAT_VERSION}
    if vision_weights != "none":  # keyed only then: the 16-bit exports keep their folders
        key["vision_weights"] = vision_weights
    if tower_only:  # S2 models: the graph holds the tower alone
        key["graph"] = "tower"
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def export_dir(model) -> Path:
    """The folder of this loaded model's ONNX export (it may not exist yet)."""
    return model_cache_dir(model.info.path) / "onnx" / fingerprint(model.info.path, model.vision.cfg,
                                                                    model.projector.cfg, model.info.vision_quantization,
                                                                    tower_only(model))


def tower_only(model) -> bool:
    """S2 models export the tower alone: their tiles' features are merged across scales before the projector."""
    return model.s2 is not None


def graph_image_config(model):
    """How a picture is prepared for the exported graph's input: the model's own steps, at the tower's side
    (fixed S2 prepares pictures at its largest scale and cuts them into tower-sized tiles after)."""
    side = model.vision.cfg.image_size
    return model.image_cfg if model.image_cfg.size == side else model.image_cfg.at_side(side)


def ensure_exported(model, precision: str, progress: bool = False) -> tuple[Path, dict]:
    """The model's `precision` file, exported now unless an earlier run left it; returns (file, manifest).

    Only what `precision` needs is exported (int8 brings fp32, which it is made from and falls back to).
    """
    folder = export_dir(model)
    manifest = read_manifest(folder)
    have = set(manifest.get("precisions", [])) if manifest else set()
    if precision not in have or not (folder / file_name(precision)).is_file():
        want = sorted(have | {precision} | ({"fp32"} if precision == "int8" else set()))
        export_parts(model.vision, None if tower_only(model) else model.projector, graph_image_config(model),
                     folder, want, progress=progress)
        manifest = read_manifest(folder)
    return folder / file_name(precision), manifest
