"""Media in a request -> decoded PIL images, with the limits that keep a bad request harmless.

Images and videos arrive as data URIs (`data:image/png;base64,...`), inline in NIM's text
(`<img src="..." />`, `<video src="..." />`) or as OpenAI `image_url` / `video_url` parts.
Remote `http(s)://` URLs only when the server allows them, `file://` only under its media folder.
Every limit (pixels, images per request, bytes) is checked before the bytes are decoded in full,
so a decompression bomb or a huge video is refused, not unpacked.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from edge_vlm.errors import MediaError

from .errors import APIError

# NIM's inline media: <img src="data:image/png;base64,..." /> and <video src="data:video/mp4;base64,..." />
INLINE_MEDIA = re.compile(r"""<(img|video)\s+src\s*=\s*(["'])(.*?)\2\s*/?>""", re.IGNORECASE | re.DOTALL)
DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w-]+=[^;,]*)*)(;base64)?,(.*)", re.DOTALL)


@dataclass
class MediaLimits:
    max_pixels: int = 40_000_000  # per image or video frame (a 14000x14000 PNG is 196 M)
    max_images: int = 32  # images plus video frames in one request
    max_bytes: int = 20 * 2**20  # one remote download
    remote: bool = False  # http(s):// URLs allowed
    media_dir: Path | None = None  # file:// URLs allowed under this folder
    remote_timeout_s: float = 10.0


@dataclass
class Media:
    kind: str  # "image" | "video"
    url: str


def split_inline(text: str) -> list[str | Media]:
    """NIM content text -> text pieces and media in the order they stand."""
    out: list[str | Media] = []
    pos = 0
    for m in INLINE_MEDIA.finditer(text):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        out.append(Media("image" if m.group(1).lower() == "img" else "video", m.group(3).strip()))
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


async def fetch_bytes(url: str, kind: str, limits: MediaLimits, param: str) -> tuple[bytes, str | None]:
    """The bytes behind a media URL and its declared MIME type (None when unknown)."""
    if url.startswith("data:"):
        m = DATA_URI.fullmatch(url)
        if m is None or not m.group(3):
            raise APIError(400, f"{kind} data URI must be base64: data:{kind}/TYPE;base64,...", param, "invalid_media")
        try:
            data = base64.b64decode(re.sub(r"\s+", "", m.group(4)), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"the {kind} is not valid base64", param, "invalid_base64") from None
        return data, m.group(1)
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        if not limits.remote:
            raise APIError(400, f"remote {kind} URLs are off on this server (start it with --allow-remote-media); "
                                "send the media inline as a data URI", param, "remote_media_disabled")
        return await _download(url, kind, limits, param)
    if scheme == "file":
        if limits.media_dir is None:
            raise APIError(400, f"file:// {kind} URLs are off on this server (start it with --media-dir DIR)",
                           param, "file_media_disabled")
        root = limits.media_dir.resolve()
        path = Path(unquote(urlparse(url).path)).resolve()
        if not path.is_relative_to(root):
            raise APIError(400, f"file:// {kind} URLs must point inside the server's media folder", param,
                           "file_media_outside")
        if not path.is_file():
            raise APIError(400, f"{kind} file not found: {path.name}", param, "media_not_found")
        if path.stat().st_size > limits.max_bytes:
            raise APIError(400, f"the {kind} file is over {limits.max_bytes // 2**20} MB", param, "media_too_large")
        return path.read_bytes(), None
    raise APIError(400, f"unsupported {kind} URL: give a data URI (data:{kind}/...;base64,...)", param,
                   "invalid_media")


async def _download(url: str, kind: str, limits: MediaLimits, param: str) -> tuple[bytes, str | None]:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=limits.remote_timeout_s, follow_redirects=True) as client:
            async with client.stream("GET", url) as r:
                if r.status_code != 200:
                    raise APIError(400, f"fetching the {kind} gave HTTP {r.status_code}", param, "media_fetch_failed")
                data = bytearray()
                async for chunk in r.aiter_bytes():
                    data += chunk
                    if len(data) > limits.max_bytes:
                        raise APIError(400, f"the remote {kind} is over {limits.max_bytes // 2**20} MB", param,
                                       "media_too_large")
                return bytes(data), r.headers.get("content-type", "").split(";")[0] or None
    except httpx.HTTPError as e:
        raise APIError(400, f"fetching the {kind} failed: {type(e).__name__}", param, "media_fetch_failed") from None


def decode_image(data: bytes, limits: MediaLimits, param: str) -> Image.Image:
    """Bytes -> RGB image; the pixel count is checked from the header, before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                check_pixels(img.size, limits, param, "image")
                img.load()
                return img.convert("RGB")
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(400, f"the image has more than {limits.max_pixels} pixels (decompression bomb guard)",
                       param, "image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise APIError(400, "the bytes are not an image (or it is corrupt)", param, "invalid_image") from None


def check_pixels(size: tuple[int, int], limits: MediaLimits, param: str, what: str) -> None:
    w, h = size
    if w * h > limits.max_pixels:
        raise APIError(400, f"the {what} is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels} "
                            "(decompression bomb guard)", param, "image_too_large")


def decode_video(data: bytes, frames: int, limits: MediaLimits, param: str) -> list[Image.Image]:
    """Bytes of a video -> `frames` RGB frames sampled evenly (edge_vlm.video)."""
    import cv2

    from edge_vlm.imaging.video import sample_frames

    with tempfile.NamedTemporaryFile(suffix=".video") as f:
        f.write(data)
        f.flush()
        cap = cv2.VideoCapture(f.name)
        try:
            if not cap.isOpened():
                raise APIError(400, "the bytes are not a video (or its codec is unsupported)", param, "invalid_video")
            size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
            count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        finally:
            cap.release()
        check_pixels(size, limits, param, "video frame")
        if count <= 0:  # sampling would have to decode every frame into memory first
            raise APIError(400, "the video does not say how many frames it has; re-encode it (e.g. as H.264 MP4)",
                           param, "invalid_video")
        try:
            return sample_frames(f.name, frames)
        except MediaError:
            raise APIError(400, "the video has no frame that can be decoded", param, "invalid_video") from None
