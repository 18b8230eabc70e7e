"""OpenAI / NIM messages -> the runtime's `Message` list, media decoded where it stands.

An image becomes an `<image>` mark at its place in the text (the session splices its embeddings
there); a video becomes one mark per picture the model makes of its sampled frames (flagged as video
frames: tiled models give each one tile; NVILA pools runs of them). Media only in user messages. Assistant
messages may carry `tool_calls` (content then may be null) and `role: "tool"` messages the
result of one call (text, with its `tool_call_id`); the session renders both in the model's format.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

from edge_vlm.errors import EdgeVLMError
from edge_vlm.session import Message
from edge_vlm.text.templates import IMAGE_MARK
from edge_vlm.text.tools import arguments_dict

from .errors import APIError
from .media import (BIG_REQUEST_PIXELS, Fit, Media, MediaLimits, PixelBudget, Probe, decode_image, decode_video,
                    give_back_memory, probe_image, probe_video, read_data_uri, read_file_url, split_inline)
from .protocol import ChatRequest, ImagePart, TextPart
from .remote import AllowList, fetch

# Pictures are decoded on two threads of their own: a burst of requests cannot start dozens of
# decodes at once (each thread's malloc arena would keep its peak), and the event loop stays free.
DECODER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="edge-vlm-decode")


def _pieces(content, i: int) -> list[str | Media]:
    if content is None:
        return []
    if isinstance(content, str):
        return split_inline(content)
    out: list[str | Media] = []
    for part in content:
        if isinstance(part, TextPart):
            out.append(part.text)
        elif isinstance(part, ImagePart):
            out.append(Media("image", part.image_url.url))
        else:
            out.append(Media("video", part.video_url.url))
    return out


class MediaReader:
    """A request's media, from URL to decoded pictures, within the server's limits: every
    picture's bytes fetched and its header read first, the request's pixels checked and
    reserved from the server-wide budget, then each decoded and reduced at once (media.py)."""

    def __init__(self, limits: MediaLimits, budget: PixelBudget, fit: Fit, model):
        """`model`: the loaded VisionLanguageModel, whose own rules say how many frames a clip gives, how
        its frames become pictures (NVILA pools runs of them) and how media stand in the text."""
        self.limits, self.budget, self.fit, self.model = limits, budget, fit, model
        # NVILA-era VILA puts each medium's mark straight into the text (its end tokens follow the
        # embeddings); older checkpoints and OpenAI parts: each part a line of its own
        self.joiner = "\n" if model.image_mark_suffix else ""
        self.allow = AllowList(limits.remote_hosts)

    async def _bytes(self, media: Media, param: str, deadline: float, fetched: list[int]) -> tuple[bytes, str | None]:
        url, kind, limits = media.url, media.kind, self.limits
        if url.startswith("data:"):
            return read_data_uri(url, kind, param)
        scheme = urlparse(url).scheme.lower() if "://" in url else ""
        if scheme in ("http", "https"):
            if not limits.remote:
                raise APIError(400, f"remote {kind} URLs are off on this server (start it with --allow-remote-media); "
                                    "send the media inline as a data URI", param, "remote_media_disabled")
            data, _ = await fetch(url, kind, param, self.allow, limits.max_bytes - fetched[0],
                                  limits.remote_timeout_s, deadline, limits.max_redirects)
            fetched[0] += len(data)
            return data, None  # (a server's Content-Type is often generic: the bytes say what they are)
        if scheme == "file":
            data = await asyncio.to_thread(read_file_url, url, kind, limits, param)
            fetched[0] += len(data)
            if fetched[0] > limits.max_bytes:
                raise APIError(400, f"the request's media files are over {limits.max_bytes // 2**20} MB", param,
                               "media_too_large")
            return data, None
        raise APIError(400, f"unsupported {kind} URL: give a data URI (data:{kind}/...;base64,...)", param,
                       "invalid_media")

    async def read(self, req: ChatRequest, multimodal: bool, deadline: float) -> tuple[list[Message], int]:
        """(messages, number of images and frames) of a request; media errors are 400s naming the message."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        plan = []  # (message, its pieces) with each medium's Probe in place of it
        probes: list[Probe] = []
        fetched = [0]
        try:
            for i, m in enumerate(req.messages):
                param = f"messages.{i}.content"
                _check_tool_fields(m, i)
                pieces = _pieces(m.content, i)
                media = [p for p in pieces if isinstance(p, Media)]
                if media and m.role != "user":
                    raise APIError(400, f"messages.{i}: only user messages can carry images or video", param,
                                   "invalid_media")
                if media and not multimodal:
                    raise APIError(400, "this model is text-only: it cannot take images or video", param,
                                   "text_only_model")
                for p in pieces:
                    if isinstance(p, str) and IMAGE_MARK in p:
                        raise APIError(400, f"the text may not contain {IMAGE_MARK} itself; send images as "
                                            "image_url parts or <img src=...> tags", param, "invalid_value")
                plan.append((m, i, pieces))
            for m, i, pieces in plan:  # fetch and read headers: nothing decoded yet
                param = f"messages.{i}.content"
                for k, p in enumerate(pieces):
                    if not isinstance(p, Media):
                        continue
                    data, mime = await self._bytes(p, param, deadline, fetched)
                    if p.kind == "image":
                        probe = await loop.run_in_executor(DECODER, probe_image, data, mime, limits, param)
                    else:
                        frames = req.num_frames_per_inference or self.model.video_frames
                        probe = await loop.run_in_executor(DECODER, probe_video, data, frames, limits, param)
                    probes.append(probe)
                    pieces[k] = probe
                    if sum(q.pictures for q in probes) > limits.max_images:
                        raise APIError(400, f"too many images/frames in one request (over {limits.max_images})",
                                       param, "too_many_images")
            pixels = sum(q.pixels for q in probes)
            if pixels > limits.max_request_pixels:
                raise APIError(400, f"the request's images and video frames are {pixels} pixels decoded, over the "
                                    f"limit of {limits.max_request_pixels} (--max-request-pixels)",
                               probes[-1].param, "images_too_large")
            if not self.budget.reserve(pixels):
                raise APIError(503, "the server is decoding as many images as it may at once; retry later", None,
                               "media_budget_full", {"Retry-After": "1"})
            try:
                out = await loop.run_in_executor(DECODER, self._decode_all, plan)
            finally:
                self.budget.release(pixels)
            return out, sum(q.pictures for q in probes)
        finally:
            for q in probes:
                q.close()

    def _decode_all(self, plan) -> list[Message]:
        """(in a decoder thread) every picture decoded and reduced, the messages built around them."""
        messages, decoded = [], 0
        try:
            for m, i, pieces in plan:
                images, texts = [], []
                for p in pieces:
                    if isinstance(p, str):
                        texts.append(p)
                        continue
                    if p.kind == "image":
                        pics = [decode_image(p, self.fit)]
                    else:
                        try:
                            pics = self.model.video_pictures(decode_video(p, self.fit))
                        except EdgeVLMError as e:  # frames that do not divide into the model's pooled runs
                            raise APIError(400, f"num_frames_per_inference: {e}", "num_frames_per_inference",
                                           "invalid_value") from None
                    decoded += p.pixels
                    images += pics
                    texts.append(IMAGE_MARK * len(pics) if isinstance(m.content, str) else
                                 self.joiner.join([IMAGE_MARK] * len(pics)))
                # inline NIM media stands in the text as it is; OpenAI parts are lines of their own (NVILA: joined)
                text = "".join(texts) if isinstance(m.content, str) else self.joiner.join(texts)
                messages.append(_message(m, text, images))
        finally:
            if decoded > BIG_REQUEST_PIXELS:
                give_back_memory()
        return messages


def _message(m, text: str, images: list) -> Message:
    if m.role == "tool":
        return Message("tool", text, tool_call_id=m.tool_call_id, name=m.name)
    if m.tool_calls:
        calls = [{"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                               "arguments": c.function.arguments}}
                 for c in m.tool_calls]
        return Message("assistant", text if m.content is not None else None, tool_calls=calls)
    return Message(m.role, text, images)


def _check_tool_fields(m, i: int) -> None:
    """400s for tool fields where they cannot stand (and a missing content)."""
    if m.role == "tool" and not m.tool_call_id:
        raise APIError(400, f"messages.{i}.tool_call_id: a tool message needs the id of the call it answers",
                       f"messages.{i}.tool_call_id", "invalid_value")
    if m.role != "tool" and m.tool_call_id is not None:
        raise APIError(400, f"messages.{i}.tool_call_id: only tool messages answer a call",
                       f"messages.{i}.tool_call_id", "invalid_value")
    if m.tool_calls is not None and m.role != "assistant":
        raise APIError(400, f"messages.{i}.tool_calls: only assistant messages make calls",
                       f"messages.{i}.tool_calls", "invalid_value")
    if m.content is None and not (m.role == "assistant" and m.tool_calls):
        raise APIError(400, f"messages.{i}.content: required (null only for an assistant message with tool_calls)",
                       f"messages.{i}.content", "missing")
    for j, c in enumerate(m.tool_calls or ()):
        try:
            arguments_dict({"function": {"name": c.function.name, "arguments": c.function.arguments}})
        except EdgeVLMError as e:
            param = f"messages.{i}.tool_calls.{j}.function.arguments"
            raise APIError(400, f"{param}: {e}", param, "invalid_value") from None
