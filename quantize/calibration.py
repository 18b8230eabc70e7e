"""Calibration data: the text (and, for VLMs, images) the LLM sees while AWQ picks its scales.

The default text is the standard library's `pydoc_data` prose, so quantizing works offline.
It is split once, deterministically: the first 80% calibrates, the last 20% is held out for
measuring perplexity (benchmarks/quality.py), so the two never overlap.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edge_vlm.errors import EdgeVLMError
from edge_vlm.preprocess import IMAGE_SUFFIXES

HELD_OUT_FRACTION = 0.2


def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def default_calibration_text() -> str:
    text = _pydoc_text()
    return text[: int(len(text) * (1 - HELD_OUT_FRACTION))]


def held_out_text() -> str:
    """Text never used for calibration: the tail of the pydoc prose."""
    text = _pydoc_text()
    return text[int(len(text) * (1 - HELD_OUT_FRACTION)):]


def read_calibration_file(path: str | Path) -> str:
    """A .txt file as is, or a .jsonl file of {"text": ...} objects (or plain JSON strings)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EdgeVLMError(f"calibration file not found: {path}")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() != ".jsonl":
        return raw
    parts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise EdgeVLMError(f"{path}:{n} is not valid JSON") from None
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise EdgeVLMError(f"{path}:{n} has no \"text\" string")
        parts.append(text)
    return "\n\n".join(parts)


def calibration_blocks(token_ids: list[int], n_samples: int, seqlen: int, source: str) -> torch.Tensor:
    """`n_samples` blocks of `seqlen` tokens, spread evenly over the text: [n_samples, seqlen]."""
    if n_samples < 1 or seqlen < 2:
        raise EdgeVLMError("--n-samples must be >= 1 and --seqlen >= 2")
    available = len(token_ids) // seqlen
    if available < n_samples:
        raise EdgeVLMError(
            f"calibration text too short: {source} has {len(token_ids)} tokens, {n_samples} samples x {seqlen} "
            f"tokens need {n_samples * seqlen}; use fewer --n-samples, a shorter --seqlen or a longer --calib file")
    ids = torch.tensor(token_ids[: available * seqlen], dtype=torch.long).view(available, seqlen)
    pick = torch.linspace(0, available - 1, n_samples).round().long()
    return ids[pick]


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise EdgeVLMError(f"--calib-images folder not found: {folder}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise EdgeVLMError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return images
