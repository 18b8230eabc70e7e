"""The conversation view: turns with inline thumbnails, answers rendered as Markdown.

A QTextBrowser over HTML we build from the Conversation. While an answer streams, the view
is re-rendered at most every 40 ms (pieces arrive far faster than anyone can read), so long
answers do not make the UI thread the bottleneck.
"""

from __future__ import annotations

import html

from PIL.ImageQt import ImageQt
from PySide6.QtCore import QTimer, QUrl, Signal
from PySide6.QtGui import QGuiApplication, QImage
from PySide6.QtWidgets import QTextBrowser

from .conversation import Conversation
from .render import markdown_to_html, plain_to_html

THUMB = 160  # px, the longer side of an inline image

STYLE = """
<style>
 .user { background:#e8f0fe; padding:6px; margin:4px 0px; }
 .assistant { background:#ffffff; padding:6px; margin:4px 0px; }
 .note { color:#8a5a00; font-style:italic; }
 .who { font-weight:bold; color:#333333; }
 .meta { color:#888888; font-size:small; }
 pre { background:#f4f4f4; padding:6px; font-family:monospace; }
 code { font-family:monospace; background:#f4f4f4; }
</style>
"""


class ChatView(QTextBrowser):
    copied = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setOpenLinks(False)
        self.anchorClicked.connect(self._on_anchor)
        self.conversation = Conversation()
        self.streaming_index: int | None = None  # the turn being streamed into
        self._thumbs: dict[str, QImage] = {}  # served by loadResource (setHtml drops added resources)
        self._pending_render = False
        self._timer = QTimer(self, singleShot=True, interval=40)
        self._timer.timeout.connect(self.render)

    # ---- content ------------------------------------------------------------------------

    def set_conversation(self, conv: Conversation) -> None:
        self.conversation = conv
        self._thumbs.clear()
        self.streaming_index = None
        self.render()

    def append_piece(self, text: str) -> None:
        """Add streamed text to the answer being written; re-render soon (coalesced)."""
        if self.streaming_index is None:
            return
        self.conversation.turns[self.streaming_index].text += text
        if not self._timer.isActive():
            self._timer.start()

    def flush(self) -> None:
        """Render now (the answer ended)."""
        self._timer.stop()
        self.render()

    # ---- rendering ----------------------------------------------------------------------

    def _thumb_url(self, n: int, k: int, image) -> str:
        key = f"thumb:{n}-{k}-{id(image)}"  # no "//": a numeric host would be rewritten as an IP
        if key not in self._thumbs:
            im = image.copy()
            im.thumbnail((THUMB, THUMB))
            self._thumbs[key] = QImage(ImageQt(im.convert("RGBA"))).copy()  # own the pixels
        return key

    def loadResource(self, kind, url):  # noqa: N802 - Qt override
        if url.scheme() == "thumb":
            return self._thumbs.get(url.toString())
        return None  # nothing else (no files, no network) is ever loaded

    def to_html(self) -> str:
        out = [STYLE]
        for n, t in enumerate(self.conversation.turns):
            if t.role == "note":
                out.append(f'<p class="note">{plain_to_html(t.text)}</p>')
                continue
            who = "You" if t.role == "user" else "Assistant"
            live = " · live" if t.live else ""
            meta = f'<span class="meta">{html.escape(t.time)}{live}</span>'
            tools = ""
            if t.role == "assistant" and n != self.streaming_index:
                tools = f' &nbsp;<a href="copy:{n}">copy</a>'
                if t.stats:
                    tools += f' <span class="meta">· {html.escape(t.stats)}</span>'
            imgs = "".join(f'<img src="{self._thumb_url(n, k, im)}"> ' for k, im in enumerate(t.images))
            body = plain_to_html(t.text) if t.role == "user" else markdown_to_html(t.text)
            if n == self.streaming_index:
                body += '<p class="meta">▍ generating…</p>'
            out.append(f'<div class="{t.role}"><span class="who">{who}</span> {meta}{tools}'
                       f'{"<br>" + imgs + "<br>" if imgs else ""}{body}</div>')
        return "".join(out)

    def render(self) -> None:
        bar = self.verticalScrollBar()
        at_bottom = bar.value() >= bar.maximum() - 4
        self.setHtml(self.to_html())
        if at_bottom or self.streaming_index is not None:
            bar.setValue(bar.maximum())

    def _on_anchor(self, url: QUrl) -> None:
        if url.scheme() == "copy":
            n = int(url.path() or url.toString().split(":", 1)[1])
            text = self.conversation.turns[n].text
            QGuiApplication.clipboard().setText(text)
            self.copied.emit(text)
