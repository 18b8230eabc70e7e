"""Held-out evaluation text for quantization quality: domains that share no source with calibration.

The built-in calibration mix (quantize/calibration.py) reads Python's standard library and the
READMEs of torch's and requests' own dependencies (filelock, sympy, urllib3, ...). Every domain
here reads only other third-party packages that an edge-vlm install already has (core
dependencies: numpy, torch, jinja2, tqdm, safetensors, tokenizers, huggingface_hub, Pillow, and
the test/optional extras for READMEs), so they install offline and no evaluation text can come
from a calibration source
(tests/quantize/test_quality_domains.py checks both the modules and the text itself):

- docs: numpy's API reference (the docstrings of its public functions) - technical prose with
  examples, written by other people in another style than Python's reference;
- readmes: the project descriptions (README as published on the package index) of the installed
  dependencies - general English prose about software, install steps, markdown;
- code: the Python source of jinja2 and tqdm - another code base's style and identifiers;
- chat: conversations in the model's own chat template about torch.nn modules and functions,
  answered with their documentation - the template's tokens around text of yet another source.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge_vlm.quantize.calibration import published_readmes

# distributions whose published description forms the readmes domain (core dependencies first)
README_DISTS = ("torch", "numpy", "safetensors", "tokenizers", "huggingface_hub", "pillow", "jinja2", "tqdm",
                "sentencepiece", "opencv-python-headless", "transformers", "accelerate", "pytest", "hypothesis",
                "scikit-image", "onnx", "onnxruntime", "gguf", "triton")
CODE_PACKAGES = ("jinja2", "tqdm")


@dataclass(frozen=True)
class Domain:
    name: str
    origin: str
    modules: tuple[str, ...]          # the packages its text is read from (none in the standard library)
    read: Callable[..., str]          # read(template) -> text


def _numpy_docs(template=None) -> str:
    import numpy

    parts = []
    for name in sorted(n for n in dir(numpy) if not n.startswith("_")):
        obj = getattr(numpy, name, None)
        if callable(obj) and not inspect.isclass(obj):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                parts.append(f"numpy.{name}\n\n{doc}")
    return "\n\n".join(parts)


def _readmes(template=None) -> str:
    return published_readmes(README_DISTS)


def _package_source(template=None) -> str:
    parts = []
    for pkg in CODE_PACKAGES:
        root = Path(importlib.import_module(pkg).__file__).parent
        for path in sorted(root.rglob("*.py")):
            text = path.read_text(encoding="utf-8", errors="replace")
            if len(text) > 2000:
                parts.append(f"# {pkg}/{path.relative_to(root).as_posix()}\n{text}")
    return "\n\n".join(parts)


def _torch_question(module: str, member: str | None) -> str:
    return f"Can you explain what `{module}.{member}` does in PyTorch?"


def _torch_chat(template=None) -> str:
    from edge_vlm.quantize.calibration import render_chats

    convs = []
    for module in ("torch.nn", "torch.nn.functional"):
        mod = importlib.import_module(module)
        names = sorted(n for n in dir(mod) if not n.startswith("_"))
        items = [(n, getattr(mod, n)) for n in names if inspect.getdoc(getattr(mod, n)) and
                 len(inspect.getdoc(getattr(mod, n))) > 200 and (inspect.isclass(getattr(mod, n)) or
                                                                 callable(getattr(mod, n)))]
        for i in range(0, len(items) - 1, 2):
            turns = []
            for n, obj in items[i:i + 2]:
                doc = inspect.getdoc(obj)[:1500]
                turns += [{"role": "user", "content": _torch_question(module, n)},
                          {"role": "assistant", "content": doc}]
            convs.append(turns)
    return render_chats(convs, template, 10**9)


DOMAINS = {
    "docs": Domain("docs", "numpy API reference (docstrings of numpy's public functions)", ("numpy",), _numpy_docs),
    "readmes": Domain("readmes", "published descriptions (READMEs) of the installed dependencies", README_DISTS,
                      _readmes),
    "code": Domain("code", "Python source of jinja2 and tqdm", CODE_PACKAGES, _package_source),
    "chat": Domain("chat", "chat turns in the model's template about torch.nn (its docstrings as answers)",
                   ("torch.nn", "torch.nn.functional"), _torch_chat),
}


def domain_ids(tokenize: Callable[[str], list[int]], n_tokens: int, template=None,
               names=tuple(DOMAINS), piece: int = 512) -> dict[str, list[int]]:
    """`n_tokens` token ids per domain, taken evenly from its whole text: pieces of `piece` tokens
    (the perplexity window, so each window is contiguous text) spread over the source, so that one
    long file does not stand for the domain."""
    out = {}
    for name in names:
        ids = tokenize(DOMAINS[name].read(template))
        pieces = max(1, n_tokens // piece)
        if len(ids) < n_tokens:
            raise SystemExit(f"evaluation domain {name} has only {len(ids)} tokens, {n_tokens} requested")
        step = (len(ids) - piece) // max(1, pieces - 1) if pieces > 1 else 0
        picked = []
        for i in range(pieces):
            picked += ids[i * step: i * step + piece]
        out[name] = picked[:n_tokens]
    return out
