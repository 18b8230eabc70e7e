"""A grouped bar chart as PNG with Pillow (already a runtime dependency; no matplotlib needed)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

COLORS = [(120, 120, 120), (31, 119, 180), (255, 127, 14), (44, 160, 44)]


def bar_chart(path: Path, panels: list[dict], title: str, width: int = 1000, height: int = 420) -> Path:
    """panels: [{"title": str, "groups": [label...], "series": {name: [value per group]}, "unit": str}]."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black")
    pw = width // max(1, len(panels))
    for p_i, panel in enumerate(panels):
        x0, y0, x1, y1 = p_i * pw + 50, 60, (p_i + 1) * pw - 20, height - 60
        draw.text((x0, 36), f"{panel['title']} ({panel['unit']})", fill="black")
        draw.line((x0, y1, x1, y1), fill="black")
        draw.line((x0, y0, x0, y1), fill="black")
        values = [v for vs in panel["series"].values() for v in vs if v is not None]
        top = max(values) * 1.15 if values and max(values) > 0 else 1.0
        groups, series = panel["groups"], list(panel["series"].items())
        gw = (x1 - x0) / max(1, len(groups))
        bw = gw * 0.8 / max(1, len(series))
        for g_i, g in enumerate(groups):
            gx = x0 + g_i * gw + gw * 0.1
            for s_i, (name, vals) in enumerate(series):
                v = vals[g_i]
                if v is None:
                    continue
                bx = gx + s_i * bw
                by = y1 - (y1 - y0) * v / top
                draw.rectangle((bx, by, bx + bw - 2, y1), fill=COLORS[s_i % len(COLORS)])
                draw.text((bx, by - 12), f"{v:.1f}" if v >= 10 else f"{v:.3g}", fill="black")
            draw.text((gx, y1 + 6), str(g), fill="black")
        for s_i, (name, _) in enumerate(series):
            lx = x0 + 10 + s_i * 150
            draw.rectangle((lx, height - 28, lx + 12, height - 16), fill=COLORS[s_i % len(COLORS)])
            draw.text((lx + 16, height - 29), name, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
