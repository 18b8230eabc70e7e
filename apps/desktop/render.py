"""Model answers (Markdown) -> HTML for the chat view.

The model's text is untrusted: raw HTML in it is shown as text, never interpreted, and image
links are not followed (a model must not make the app load local files). Qt-free.
"""

from __future__ import annotations

import html
import re

import markdown

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _markdown() -> markdown.Markdown:
    md = markdown.Markdown(extensions=["fenced_code", "tables", "sane_lists"])
    md.preprocessors.deregister("html_block")
    for name in ("html", "image_link", "image_reference", "short_image_ref"):
        if name in md.inlinePatterns:
            md.inlinePatterns.deregister(name)
    return md


_MD = _markdown()


def markdown_to_html(text: str) -> str:
    """Render Markdown (code blocks, lists, tables, emphasis) with any raw HTML escaped."""
    text = _CONTROL.sub("\ufffd", text)
    # Raw HTML is escaped before Markdown sees it (outside code, where Markdown escapes it itself).
    parts = re.split(r"(```.*?(?:```|$)|`[^`\n]*`)", text, flags=re.S)
    text = "".join(p if i % 2 else html.escape(p, quote=False) for i, p in enumerate(parts))
    _MD.reset()
    return _MD.convert(text)


def plain_to_html(text: str) -> str:
    """The user's own text: shown as typed (line breaks kept), never interpreted."""
    return html.escape(_CONTROL.sub("\ufffd", text)).replace("\n", "<br>")
