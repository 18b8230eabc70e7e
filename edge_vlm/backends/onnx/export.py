"""The vision tower (up to its selected layer) and its projector as ONNX files, through torch's exporter.

One graph, pixels [N, 3, S, S] -> LLM-space features [N, tokens, hidden], with N dynamic so a
video's frames go through in one run. fp32 is exported from an fp32 copy of the modules, fp16
from an fp16 copy (what CUDA runs), int8 is made from the fp32 file by ONNX Runtime's quantizer
(int8.py). Every file passes onnx's checker before it is moved into place; files are written
into a temporary folder beside the destination and renamed in (weights first, graph last, the
manifest last of all), so a crash never leaves a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from ...errors import EdgeVLMError
from . import int8

PRECISIONS = ("fp32", "fp16", "int8")
OPSET = 20
MAX_BATCH = 64  # the dynamic batch axis' upper bound: frames of one video, or images of one question
# Bump when the exported graph changes for the same weights, so caches built by older code are rebuilt.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def file_name(precision: str) -> str:
    return f"vision-{precision}.onnx"


class VisionGraph(nn.Module):
    """The modules one ONNX file holds: the tower's selected layer feeds the projector, or the tower alone
    (`projector` None: S2 models, whose tiles' features are merged across scales before the projector,
    in torch)."""

    def __init__(self, tower: nn.Module, projector: nn.Module | None):
        super().__init__()
        self.tower, self.projector = tower, projector

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.tower(pixels)
        return feats if self.projector is None else self.projector(feats)


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx logs progress lines and internal deprecation warnings: none of them is the user's business."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_graph(graph: VisionGraph, path: Path, image_size: int, dtype: torch.dtype) -> Path:
    """`graph` in `dtype` -> `path` (+ `path`.data, its weights), checked by onnx's checker."""
    # optional: onnx (the onnx extra)
    import onnx

    example = torch.zeros(2, 3, image_size, image_size, dtype=dtype)  # 2, not 1: a size-1 axis would be fixed
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(graph.eval(), (example,), str(path), input_names=["pixels"], output_names=["features"],
                          dynamic_shapes={"pixels": {0: batch}}, opset_version=OPSET, dynamo=True,
                          external_data=True, verbose=False)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def _graph_in(tower: nn.Module, projector: nn.Module | None, dtype: torch.dtype) -> VisionGraph:
    """The modules in `dtype`, copied only when they are not in it already (the CPU backend may run them in bf16)."""
    mods = [m if m is None or next(m.parameters()).dtype == dtype else copy.deepcopy(m).to(dtype)
            for m in (tower, projector)]
    return VisionGraph(*mods)


def export_parts(tower: nn.Module, projector: nn.Module | None, image_cfg, out_dir, precisions=PRECISIONS,
                 int8_method: str | None = None, calibration=None, progress: bool = False,
                 extra_manifest: dict | None = None) -> dict[str, Path]:
    """Export `tower` + `projector` (None: the tower alone) into `out_dir` in each of `precisions`; returns
    precision -> file. `image_cfg` prepares pictures for the graph's input (the tower's side).

    `calibration`: images (anything `preprocess` takes) for the int8 step (static calibration and the
    feature check); None uses synthetic ones. `out_dir/manifest.json` records what was written,
    including the int8 file's feature cosine to fp32 (the runtime refuses int8 below int8.MIN_COSINE).
    """

    precisions = tuple(dict.fromkeys(precisions))
    unknown = set(precisions) - set(PRECISIONS)
    if unknown or not precisions:
        raise ValueError(f"precisions must be among {', '.join(PRECISIONS)}, got {', '.join(precisions) or 'none'}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = tower.cfg.image_size
    steps = [p for p in ("fp32", "fp16") if p in precisions or (p == "fp32" and "int8" in precisions)]
    steps += ["int8"] if "int8" in precisions else []
    tokens = tower.num_tokens if projector is None else projector.num_tokens(tower.num_tokens)
    manifest = {"format": FORMAT_VERSION, "opset": OPSET, "image_size": size, "arch": tower.cfg.arch,
                "projector": "none (tower only)" if projector is None else projector.cfg.kind, "tokens": tokens,
                "hidden": tower.cfg.hidden_size if projector is None else projector.cfg.out_dim,
                "torch": torch.__version__, "precisions": list(precisions),
                **(extra_manifest or {})}
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        bar = tqdm(steps, desc="exporting vision tower to ONNX", unit="file", disable=not progress, file=sys.stderr)
        for step in bar:
            bar.set_postfix_str(step)
            if step == "int8":
                manifest["int8"] = int8.quantize(tmp / file_name("fp32"), tmp / file_name("int8"),
                                                 int8.calibration_pixels(image_cfg, calibration),
                                                 int8.check_pixels(image_cfg), int8_method)
            else:
                dtype = torch.float32 if step == "fp32" else torch.float16
                export_graph(_graph_in(tower, projector, dtype), tmp / file_name(step), size, dtype)
        written = {p: _move_in(tmp / file_name(p), out_dir) for p in precisions}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        os.replace(tmp / MANIFEST, out_dir / MANIFEST)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_in(path: Path, out_dir: Path) -> Path:
    """Rename `path` and its weights file into `out_dir`: the weights first, so the graph never points at nothing."""
    data = path.with_name(path.name + ".data")
    if data.exists():
        os.replace(data, out_dir / data.name)
    os.replace(path, out_dir / path.name)
    return out_dir / path.name


def export_vision(model, out_dir, precisions=PRECISIONS, int8_method: str | None = None, calibration=None,
                  progress: bool = False) -> dict[str, Path]:
    """A loaded VisionLanguageModel's tower and projector -> ONNX files in `out_dir` (see `export_parts`)."""

    if not model.is_multimodal:
        raise EdgeVLMError(f"{model.info.path} is a text-only model: it has no vision tower to export")
    return export_parts(model.vision, model.projector, model.image_cfg, out_dir, precisions, int8_method,
                        calibration, progress)


def read_manifest(folder: Path) -> dict | None:
    """The manifest of an export folder; None when there is none (not exported, or an export was cut short)."""
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
