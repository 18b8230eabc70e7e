"""The `edge-vlm` command.

Subcommands register themselves through the `edge_vlm.commands` entry-point group (see
pyproject.toml): each entry is a `register(subparsers)` function that adds its parser and
sets `func(args) -> exit code`. The runtime's own commands (chat, info, doctor, export) are the
modules beside this one; apps and the quantizer plug in the same way, so the runtime never
imports them.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from importlib.metadata import entry_points

from ..errors import EdgeVLMError
from ..version import __version__
from . import chat, doctor, export, info

EXAMPLES = """examples:
  edge-vlm chat --model Efficient-Large-Model/VILA1.5-3b --image photo.jpg "What is in this picture?"
  edge-vlm chat --model ./my-vila --video clip.mp4 --frames 8 "What happens in this video?"
  edge-vlm chat --model ./my-vila                      # interactive: /image PATH, /reset, /quit
  edge-vlm info ./my-vila                               # architecture, size, memory needed
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-vlm", description="Run vision-language models on your own GPU (or CPU), privately.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"edge-vlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (chat, info, doctor, export):
        command.register(sub)
    for ep in sorted(entry_points(group="edge_vlm.commands"), key=lambda e: e.name):
        try:
            ep.load()(sub)
        except ImportError as e:  # an optional extra is not installed: say so when it is used
            p = sub.add_parser(ep.name, help=f"(unavailable: {e.name or e} is not installed)")
            p.set_defaults(func=lambda args, err=e: _missing(err))
    return parser


def _missing(err: ImportError) -> int:
    print(f"edge-vlm: error: this command needs {err.name or err}; install the matching extra "
          f"(e.g. pip install 'edge-vlm[app]')", file=sys.stderr)
    return 2


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as the CLI's own lines (`edge-vlm: warning: ...`), not file:line plus source."""
    return f"edge-vlm: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except EdgeVLMError as e:
        print(f"edge-vlm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "out of memory" not in str(e):
            raise
        print("edge-vlm: error: out of memory; try a smaller --max-context or a 4-bit model", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
