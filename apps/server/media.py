"""Media in a request -> decoded PIL images, with the limits that keep a bad request harmless.

Images and videos arrive as data URIs (`data:image/png;base64,...`), inline in NIM's text
(`<img src="..." />`, `<video src="..." />`) or as OpenAI `image_url` / `video_url` parts.
Remote `http(s)://` URLs only when the server allows them (remote.py fetches them), `file://`
only under its media folder.

Memory is bounded before anything is decoded: every image's size is read from its header (a
video's from its container), checked per image (`max_pixels`, the decompression-bomb guard),
summed over the request (`max_request_pixels`) and reserved from the server's `PixelBudget`
(the decoded pixels of all requests in flight). Each picture is then decoded and at once
reduced to what the model reads of it (`Fit`), and the request's budget is given back.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import io
import re
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from edge_vlm.errors import MediaError
from edge_vlm.imaging.tiling import choose_grid

from .errors import APIError

# NIM's inline media: <img src="data:image/png;base64,..." /> and <video src="data:video/mp4;base64,..." />
INLINE_MEDIA = re.compile(r"""<(img|video)\s+src\s*=\s*(["'])(.*?)\2\s*/?>""", re.IGNORECASE | re.DOTALL)
DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w-]+=[^;,]*)*)(;base64)?,(.*)", re.DOTALL)
# the MIME types a client may declare for the image formats Pillow names
MIME_ALIASES = {"image/jpg": "image/jpeg", "image/x-png": "image/png", "image/x-ms-bmp": "image/bmp"}
BIG_REQUEST_PIXELS = 8_000_000  # a request that decoded more gives its freed memory back to the system


@dataclass
class MediaLimits:
    max_pixels: int = 40_000_000  # per image or video frame (a 14000x14000 PNG is 196 M)
    max_images: int = 32  # images plus video frames in one request
    max_bytes: int = 20 * 2**20  # the media of one request, inline or fetched
    max_request_pixels: int = 80_000_000  # decoded pixels of one request, images and video frames together
    remote: bool = False  # http(s):// URLs allowed
    remote_hosts: tuple[str, ...] = ()  # if given, the only hosts (names, .suffixes, IP networks) fetched
    media_dir: Path | None = None  # file:// URLs allowed under this folder
    remote_timeout_s: float = 10.0  # one remote fetch, redirects included (and never past the request's deadline)
    max_redirects: int = 3


@dataclass
class Media:
    kind: str  # "image" | "video"
    url: str


@dataclass
class Probe:
    """What a picture's header says, before it is decoded."""

    data: bytes
    kind: str
    param: str
    size: tuple[int, int]
    pictures: int = 1  # images: 1; videos: the frames that will be sampled
    video_path: str | None = None  # videos: the temporary file cv2 reads
    _file: object = field(default=None, repr=False)

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1] * self.pictures

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class PixelBudget:
    """Decoded pixels of all requests in flight, bounded: a request reserves its images' header
    sizes before decoding them and gives them back when done; over the bound it is refused (503)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_use = 0
        self._lock = threading.Lock()

    def reserve(self, pixels: int) -> bool:
        with self._lock:
            if self.in_use + pixels > self.capacity:
                return False
            self.in_use += pixels
            return True

    def release(self, pixels: int) -> None:
        with self._lock:
            self.in_use -= pixels


class Fit:
    """How far a picture can be shrunk right after decoding without changing what the model
    reads: its preprocessing resizes to the tower's side (or, tiled, to a grid of tiles), so an
    image far larger than that is resized (bicubic, antialiased) to twice the side the model
    then resizes to on its tighter axis. The model's input then differs from the full-size
    path's by at most a few grey levels (tests/apps/test_server_media.py measures it)."""

    OVERSAMPLE = 2.0
    MIN_GAIN = 1.5  # shrink only when it saves more than this factor per side

    def __init__(self, model):
        self.image_cfg, self.tiling = model.image_cfg, model.tiling

    def room(self, size: tuple[int, int], video_frame: bool = False) -> float:
        """How many times larger than the model's working size the picture is (on its tighter axis)."""
        w, h = size
        if self.tiling is not None:
            s = self.tiling.tile_size
            if video_frame or self.tiling.max_tiles <= 1:
                return min(w, h) / s
            cols, rows = choose_grid(w, h, self.tiling)
            return min(w / (cols * s), h / (rows * s))
        if self.image_cfg is None:
            return 1.0
        cfg = self.image_cfg
        side = max(cfg.resize_to, cfg.squash_first or 0)  # the largest side a step resizes to
        if cfg.pad_to_square:  # padded to its long side first, so that side is the one resized
            return max(w, h) / side
        return min(w, h) / side  # squashed or short side scaled: the tighter axis

    def target(self, size: tuple[int, int], video_frame: bool = False) -> tuple[int, int] | None:
        """The size to shrink a picture of `size` to, or None to keep it."""
        scale = self.room(size, video_frame) / self.OVERSAMPLE
        if scale < self.MIN_GAIN:
            return None
        return max(1, round(size[0] / scale)), max(1, round(size[1] / scale))

    def reduce(self, img: Image.Image, video_frame: bool = False) -> Image.Image:
        size = self.target(img.size, video_frame)
        return img if size is None else img.resize(size, Image.BICUBIC)


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


def read_data_uri(url: str, kind: str, param: str) -> tuple[bytes, str | None]:
    """The bytes of a base64 data URI and its declared MIME type (None when it names none)."""
    m = DATA_URI.fullmatch(url)
    if m is None or not m.group(3):
        raise APIError(400, f"{kind} data URI must be base64: data:{kind}/TYPE;base64,...", param, "invalid_media")
    try:
        data = base64.b64decode(re.sub(r"\s+", "", m.group(4)), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"the {kind} is not valid base64", param, "invalid_base64") from None
    mime = m.group(1).lower() if m.group(1) else None
    if mime is not None and not mime.startswith(kind + "/"):
        raise APIError(400, f"the data URI says {mime}: not {kind} data ({kind}/...)", param, "invalid_media")
    return data, mime


def read_file_url(url: str, kind: str, limits: MediaLimits, param: str) -> bytes:
    if limits.media_dir is None:
        raise APIError(400, f"file:// {kind} URLs are off on this server (start it with --media-dir DIR)",
                       param, "file_media_disabled")
    parsed = urlparse(url)
    raw = unquote(parsed.path)
    if parsed.netloc not in ("", "localhost") or any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise APIError(400, f"file:// {kind} URL: a path on this machine, without control characters", param,
                       "invalid_media")
    root = limits.media_dir.resolve()
    try:
        path = Path(raw).resolve()
    except (OSError, ValueError):
        raise APIError(400, f"file:// {kind} URL: not a path", param, "invalid_media") from None
    if not path.is_relative_to(root):
        raise APIError(400, f"file:// {kind} URLs must point inside the server's media folder", param,
                       "file_media_outside")
    if not path.is_file():
        raise APIError(400, f"{kind} file not found: {path.name}", param, "media_not_found")
    if path.stat().st_size > limits.max_bytes:
        raise APIError(400, f"the {kind} file is over {limits.max_bytes // 2**20} MB", param, "media_too_large")
    return path.read_bytes()


def probe_image(data: bytes, mime: str | None, limits: MediaLimits, param: str) -> Probe:
    """The image's size from its header (nothing decoded), its format checked against the
    declared MIME type, and the per-image pixel limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                size, fmt = img.size, img.format
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(400, f"the image has more than {limits.max_pixels} pixels (decompression bomb guard)",
                       param, "image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise APIError(400, "the bytes are not an image (or it is corrupt)", param, "invalid_image") from None
    actual = Image.MIME.get(fmt or "", "")
    if mime is not None and MIME_ALIASES.get(mime, mime) != actual:
        raise APIError(400, f"the data URI says {mime} but the bytes are {actual or fmt or 'something else'}",
                       param, "invalid_media")
    check_pixels(size, limits, param, "image")
    return Probe(data, "image", param, size)


def probe_video(data: bytes, frames: int, limits: MediaLimits, param: str) -> Probe:
    """The video's frame size and count from its container (no frame decoded)."""
    import cv2

    f = tempfile.NamedTemporaryFile(suffix=".video")
    try:
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
    except BaseException:
        f.close()
        raise
    return Probe(data, "video", param, size, pictures=min(frames, count), video_path=f.name, _file=f)


def check_pixels(size: tuple[int, int], limits: MediaLimits, param: str, what: str) -> None:
    w, h = size
    if w * h > limits.max_pixels:
        raise APIError(400, f"the {what} is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels} "
                            "(decompression bomb guard)", param, "image_too_large")


def decode_image(probe: Probe, fit: Fit) -> Image.Image:
    """A probed image -> RGB, reduced to what the model reads as it is decoded (JPEG: by the
    decoder's own scaling, so the full size never exists in memory)."""
    try:
        with Image.open(io.BytesIO(probe.data)) as img:
            size = fit.target(img.size)
            if size is not None and img.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale, still >= size
                img.draft("RGB", size)
            img.load()
            # to 8-bit channels first (Pillow resizes 1-bit and palette images only by nearest neighbour)
            work = img if img.mode in ("RGB", "L") else img.convert("L" if img.mode == "1" else "RGB")
            out = fit.reduce(work)
            if out.mode != "RGB":
                out = out.convert("RGB")
            return out.copy() if out is img else out  # (closing the file frees `img` itself)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        raise APIError(400, "the bytes are not an image (or it is corrupt)", probe.param, "invalid_image") from None


def decode_video(probe: Probe, fit: Fit) -> list[Image.Image]:
    """A probed video -> its sampled RGB frames (edge_vlm.imaging.video), each reduced as it comes."""
    from edge_vlm.imaging.video import sample_frames

    try:
        frames = sample_frames(probe.video_path, probe.pictures)
    except MediaError:
        raise APIError(400, "the video has no frame that can be decoded", probe.param, "invalid_video") from None
    return [fit.reduce(f, video_frame=True) for f in frames]


def give_back_memory() -> None:
    """Return freed heap memory to the system (glibc keeps large freed blocks in its arenas, so a
    burst of big decodes would otherwise stay in the server's resident set)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
