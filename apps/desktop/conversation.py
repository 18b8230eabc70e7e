"""A conversation as the app shows it, saved as JSON with its images alongside, and as Markdown.

Layout on disk (a folder per conversation):
    conversation.json   {"version": 1, "model": ..., "system": ..., "turns": [...]}
    images/003-0.png    the images of turn 3, referenced from the JSON by relative path
Qt-free: this is plain data, so saving and reopening are testable without a window.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from PIL import Image

from edge_vlm.errors import EdgeVLMError
from edge_vlm.imaging.preprocess import load_image

FORMAT_VERSION = 1


@dataclass
class Turn:
    role: str  # "user" | "assistant" | "note"
    text: str
    images: list[Image.Image] = field(default_factory=list)
    time: str = field(default_factory=lambda: datetime.now().strftime("%Y-%m-%d %H:%M:%S"))
    live: bool = False  # asked by Live mode about a camera frame
    stats: str = ""  # "TTFT 26 ms, 1520 tok/s" for answers


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)
    model: str = ""
    system: str = ""

    def add(self, role: str, text: str, images=(), **kw) -> Turn:
        turn = Turn(role, text, [_as_pil(im) for im in images], **kw)
        self.turns.append(turn)
        return turn

    # ---- JSON + images ------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Write conversation.json and images/ into `folder` (created); returns the JSON path."""
        folder = Path(folder)
        img_dir = folder / "images"
        if img_dir.exists():
            shutil.rmtree(img_dir)  # a re-save must not leave images of deleted turns behind
        turns = []
        for n, t in enumerate(self.turns):
            names = []
            for k, im in enumerate(t.images):
                img_dir.mkdir(parents=True, exist_ok=True)
                name = f"images/{n:03d}-{k}.png"
                im.save(folder / name)
                names.append(name)
            turns.append({"role": t.role, "text": t.text, "images": names, "time": t.time, "live": t.live,
                          "stats": t.stats})
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "conversation.json"
        data = {"version": FORMAT_VERSION, "model": self.model, "system": self.system, "turns": turns}
        path.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Conversation":
        """Read a folder (or its conversation.json) written by save()."""
        path = Path(path)
        if path.is_dir():
            path = path / "conversation.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EdgeVLMError(f"no saved conversation at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EdgeVLMError(f"{path} is not a saved conversation ({e})") from None
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise EdgeVLMError(f"{path} is not a saved conversation of format version {FORMAT_VERSION}")
        conv = cls(model=data.get("model", ""), system=data.get("system", ""))
        for t in data.get("turns", []):
            images = [load_image(path.parent / name) for name in t.get("images", [])]
            conv.turns.append(Turn(t["role"], t["text"], images, t.get("time", ""), t.get("live", False),
                                   t.get("stats", "")))
        return conv

    # ---- Markdown -----------------------------------------------------------------------

    def to_markdown(self, image_dir: str = "images") -> str:
        """The chat as Markdown; images are linked as `image_dir/NNN-K.png` (see export_markdown)."""
        lines = ["# edge-vlm conversation", ""]
        if self.model:
            lines += [f"Model: `{self.model}`", ""]
        if self.system:
            lines += [f"System prompt: {self.system}", ""]
        for n, t in enumerate(self.turns):
            who = {"user": "You", "assistant": "Assistant", "note": "Note"}.get(t.role, t.role)
            tag = " (live)" if t.live else ""
            lines.append(f"### {who}{tag} · {t.time}")
            lines.append("")
            for k in range(len(t.images)):
                lines.append(f"![image {k + 1}]({image_dir}/{n:03d}-{k}.png)")
            if t.images:
                lines.append("")
            lines.append(t.text)
            if t.stats:
                lines += ["", f"*{t.stats}*"]
            lines.append("")
        return "\n".join(lines)

    def export_markdown(self, md_path: str | Path) -> Path:
        """Write `chat.md` plus its images in `chat_images/` next to it."""
        md_path = Path(md_path)
        image_dir = md_path.stem + "_images"
        for n, t in enumerate(self.turns):
            for k, im in enumerate(t.images):
                (md_path.parent / image_dir).mkdir(parents=True, exist_ok=True)
                im.save(md_path.parent / image_dir / f"{n:03d}-{k}.png")
        md_path.write_text(self.to_markdown(image_dir), encoding="utf-8")
        return md_path


def _as_pil(im) -> Image.Image:
    """Paths, arrays and PIL images all become decoded RGB PIL images (what save() writes)."""
    return load_image(im)
