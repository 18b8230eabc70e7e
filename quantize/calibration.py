"""Calibration data: the text (and, for VLMs, images) the LLM sees while AWQ picks its scales.

The built-in set is a mix of four formats, all from what every install already has (it works
offline) and none from a package that an evaluation domain reads (benchmarks/text_domains.py;
tests/quantize/test_quality_domains.py checks the sources and the text):

- prose: the language reference prose of `pydoc_data.topics` (its first 80%; the last 20% is
  kept as an in-domain check for benchmarks/quality.py);
- code: the source of a fixed list of standard-library modules;
- chat: conversations in the model's own chat template, a user asking about a standard-library
  module or function and the assistant answering with its documentation;
- readmes: the published descriptions (Markdown / reStructuredText READMEs: headings, badges, URLs,
  tables, install commands) of the packages that torch, huggingface_hub and requests pull in
  (filelock, sympy, fsspec, urllib3, ...). None of the first three looks like Markdown, and a
  model calibrated without it rounded README-like text worse than plain RTN did.

Users quantize once and then talk about anything: one source alone fits the scales and the
clipping to that source's statistics (and, for a chat model, never shows the template's tokens).
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from edge_vlm.errors import EdgeVLMError
from edge_vlm.imaging.preprocess import IMAGE_SUFFIXES

HELD_OUT_FRACTION = 0.2
CHARS_PER_TOKEN = 6  # a high estimate: read enough text for the blocks asked for, not the whole source

# standard-library modules whose source is the code part (large, ordinary, pure Python)
CODE_MODULES = ("argparse", "json.decoder", "json.encoder", "textwrap", "dataclasses", "pathlib", "functools",
                "collections", "shutil", "csv", "heapq", "statistics", "fractions", "configparser", "string",
                "difflib", "calendar", "ipaddress", "enum", "tarfile", "zipfile", "logging", "typing",
                "email.message", "urllib.parse", "http.client", "gettext", "glob", "tempfile", "subprocess")
# standard-library modules the chat turns ask about (module doc, then two of its functions/classes)
CHAT_MODULES = ("os", "sys", "re", "math", "random", "datetime", "itertools", "operator", "pickle", "copy",
                "bisect", "struct", "hashlib", "hmac", "base64", "binascii", "secrets", "uuid", "time",
                "threading", "queue", "sched", "socket", "select", "selectors", "signal", "mmap", "codecs",
                "unicodedata", "locale", "decimal", "numbers", "cmath", "array", "weakref", "types",
                "contextlib", "abc", "atexit", "traceback", "warnings", "inspect", "dis", "ast", "tokenize",
                "keyword", "platform", "errno", "io", "fnmatch", "linecache", "filecmp", "zlib", "gzip",
                "bz2", "lzma", "sqlite3", "shelve", "dbm", "xml.dom.minidom", "html", "html.parser",
                "mimetypes", "wave", "colorsys", "optparse", "getopt", "pprint", "reprlib", "graphlib",
                "asyncio", "concurrent.futures", "multiprocessing", "unittest", "doctest", "timeit",
                "cProfile", "pstats", "trace", "importlib", "pkgutil", "runpy", "zipimport",
                "smtplib", "ftplib", "imaplib", "poplib", "socketserver", "http.server", "urllib.request",
                "webbrowser", "wsgiref", "xmlrpc.client", "quopri", "plistlib", "netrc",
                "tomllib", "stat", "pwd", "grp", "termios", "tty", "pty", "fcntl", "resource", "syslog")

# installed with every edge-vlm (dependencies of torch, huggingface_hub, requests), never read by an
# evaluation domain: their published descriptions are the readmes part
README_DISTS = ("filelock", "typing_extensions", "sympy", "networkx", "fsspec", "mpmath", "packaging", "pyyaml",
                "requests", "charset_normalizer", "idna", "urllib3", "certifi")

MIX = (("prose", 2), ("code", 1), ("chat", 1), ("readmes", 1))  # share of the samples per source


@dataclass(frozen=True)
class CalibrationSource:
    """One part of the built-in mix: where its text comes from (for the disjointness test and the
    quantize summary) and how to read it."""

    name: str
    origin: str                       # human-readable: what the text is
    modules: tuple[str, ...]          # the Python modules it is read from (all standard library)
    read: Callable[..., str]          # read(max_chars, template) -> text


def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def default_calibration_text() -> str:
    """The prose part of the mix: the first 80% of the pydoc prose."""
    text = _pydoc_text()
    return text[: int(len(text) * (1 - HELD_OUT_FRACTION))]


def held_out_text() -> str:
    """Text never used for calibration: the tail of the pydoc prose (the in-domain check)."""
    text = _pydoc_text()
    return text[int(len(text) * (1 - HELD_OUT_FRACTION)):]


def _read_prose(max_chars: int, template=None) -> str:
    return default_calibration_text()[:max_chars]


def _read_code(max_chars: int, template=None) -> str:
    parts, n = [], 0
    for name in CODE_MODULES:
        try:
            src = inspect.getsource(importlib.import_module(name))
        except (ImportError, OSError, TypeError):
            continue
        parts.append(f"# {name.replace('.', '/')}.py\n{src}")
        n += len(src)
        if n >= max_chars:
            break
    return "\n\n".join(parts)


def _doc(obj, limit: int = 1500) -> str | None:
    doc = inspect.getdoc(obj)
    if not doc or len(doc) < 80:
        return None
    return doc[:limit].rsplit("\n", 1)[0] if len(doc) > limit else doc


def _public_members(module) -> list[tuple[str, object]]:
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    out = []
    for n in sorted(set(names)):
        obj = getattr(module, n, None)
        if (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)) and _doc(obj):
            out.append((n, obj))
    return out


def chat_conversations(modules: tuple[str, ...], question: Callable[[str, str | None], str]) -> list[list[dict]]:
    """One conversation per importable module: its documentation, then that of two of its members."""
    convs = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        turns = []
        doc = _doc(mod)
        if doc:
            turns += [{"role": "user", "content": question(name, None)}, {"role": "assistant", "content": doc}]
        members = _public_members(mod)
        for member, obj in members[:: max(1, len(members) // 2)][:2]:
            turns += [{"role": "user", "content": question(name, member)},
                      {"role": "assistant", "content": _doc(obj)}]
        if turns:
            convs.append(turns)
    return convs


def _stdlib_question(module: str, member: str | None) -> str:
    if member is None:
        return f"What is the Python module `{module}` for?"
    return f"How do I use `{member}` from `{module}`?"


def render_chats(convs: list[list[dict]], template, max_chars: int) -> str:
    """Conversations rendered by the model's chat template (plain "role: text" lines without one)."""
    parts, n = [], 0
    for turns in convs:
        if template is not None:
            text = template.render(turns, add_generation_prompt=False)
        else:
            text = "\n".join(f"{t['role']}: {t['content']}" for t in turns)
        parts.append(text)
        n += len(text)
        if n >= max_chars:
            break
    return "\n".join(parts)


def _read_chat(max_chars: int, template=None) -> str:
    return render_chats(chat_conversations(CHAT_MODULES, _stdlib_question), template, max_chars)


def published_readmes(dists, min_chars: int = 500) -> str:
    """The published descriptions (PyPI READMEs) of those of `dists` that are installed, joined;
    stubs shorter than `min_chars` are left out."""
    import importlib.metadata

    parts = []
    for dist in dists:
        try:
            meta = importlib.metadata.metadata(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        text = (meta.get_payload() or meta.get("Description") or "").strip()
        if len(text) >= min_chars:
            parts.append(text)
    return "\n\n".join(parts)


def _read_readmes(max_chars: int, template=None) -> str:
    """All of them (about 90k characters): the blocks are then spread over every package."""
    return published_readmes(README_DISTS)


SOURCES = {
    "prose": CalibrationSource("prose", "Python language reference prose (pydoc_data.topics, first 80%)",
                               ("pydoc_data.topics",), _read_prose),
    "code": CalibrationSource("code", f"Python standard-library source ({len(CODE_MODULES)} modules)",
                              CODE_MODULES, _read_code),
    "chat": CalibrationSource("chat", "chat turns in the model's template about standard-library modules "
                              "(their docstrings as answers)", CHAT_MODULES, _read_chat),
    "readmes": CalibrationSource("readmes", "published READMEs of torch's and requests' own dependencies "
                                 f"({len(README_DISTS)} packages: filelock, sympy, fsspec, urllib3, ...)",
                                 README_DISTS, _read_readmes),
}


def mix_counts(n_samples: int) -> dict[str, int]:
    """Samples per source: proportional to MIX, every source at least one when n_samples allows."""
    total = sum(w for _, w in MIX)
    counts = {name: max(1, n_samples * w // total) if n_samples >= len(MIX) else 0 for name, w in MIX}
    if n_samples < len(MIX):
        for name, _ in MIX[:n_samples]:
            counts[name] = 1
    counts[MIX[0][0]] += n_samples - sum(counts.values())
    return counts


def builtin_blocks(tokenize: Callable[[str], list[int]], n_samples: int, seqlen: int, template=None
                   ) -> tuple[torch.Tensor, list[str]]:
    """[n_samples, seqlen] token blocks from the built-in mix, and one line per source used. A source
    shorter than its share (the readmes, with long blocks or a slim install) gives the rest to prose."""
    counts = mix_counts(n_samples)
    first = MIX[0][0]
    ids = {}
    for name, n in counts.items():
        if name == first or not n:
            continue
        got = tokenize(SOURCES[name].read(n * seqlen * CHARS_PER_TOKEN, template))
        counts[name] = min(n, len(got) // seqlen)
        counts[first] += n - counts[name]
        ids[name] = got
    ids[first] = tokenize(SOURCES[first].read(counts[first] * seqlen * CHARS_PER_TOKEN, template))
    blocks, lines = [], []
    for name, n in counts.items():
        if not n:
            continue
        blocks.append(calibration_blocks(ids[name], n, seqlen, f"the built-in {name} text"))
        lines.append(f"{name}: {n} x {seqlen} tokens of {SOURCES[name].origin}")
    return torch.cat(blocks), lines


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
