"""The `edge-vlm` command line: the runtime's own commands (chat, info, doctor, export) and the shared
options; tools add their commands through the `edge_vlm.commands` entry points.

The top floor of the runtime: it may import anything in edge_vlm; nothing in edge_vlm imports it
(tools use `edge_vlm.cli.options` for the options they share).
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
