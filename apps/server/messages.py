"""OpenAI / NIM messages -> the runtime's `Message` list, media decoded where it stands.

An image becomes an `<image>` mark at its place in the text (the session splices its embeddings
there); a video becomes one mark per sampled frame (flagged as a video frame: tiled models give it one tile). Media only in user messages. Assistant
messages may carry `tool_calls` (content then may be null) and `role: "tool"` messages the
result of one call (text, with its `tool_call_id`); the session renders both in the model's format.
"""

from __future__ import annotations

import asyncio

from edge_vlm.text.templates import IMAGE_MARK
from edge_vlm.errors import EdgeVLMError
from edge_vlm.session import Message
from edge_vlm.vlm import VisionLanguageModel

from .errors import APIError
from .media import Media, MediaLimits, decode_image, decode_video, fetch_bytes, split_inline
from .protocol import ChatRequest, ImagePart, TextPart


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


async def to_messages(req: ChatRequest, limits: MediaLimits, multimodal: bool) -> tuple[list[Message], int]:
    """(messages, number of images and frames) of a request; media errors are 400s naming the message."""
    messages, total = [], 0
    for i, m in enumerate(req.messages):
        param = f"messages.{i}.content"
        _check_tool_fields(m, i)
        pieces = _pieces(m.content, i)
        media = [p for p in pieces if isinstance(p, Media)]
        if media and m.role != "user":
            raise APIError(400, f"messages.{i}: only user messages can carry images or video", param, "invalid_media")
        if media and not multimodal:
            raise APIError(400, "this model is text-only: it cannot take images or video", param, "text_only_model")
        images = []
        texts: list[str] = []
        for p in pieces:
            if isinstance(p, str):
                if IMAGE_MARK in p:
                    raise APIError(400, f"the text may not contain {IMAGE_MARK} itself; send images as "
                                        "image_url parts or <img src=...> tags", param, "invalid_value")
                texts.append(p)
                continue
            data, mime = await fetch_bytes(p.url, p.kind, limits, param)
            if p.kind == "image":
                pics = [await asyncio.to_thread(decode_image, data, limits, param)]
            else:
                pics = await asyncio.to_thread(decode_video, data, req.num_frames_per_inference, limits, param)
                pics = [VisionLanguageModel.mark_video_frame(f) for f in pics]  # tiled models: one tile a frame
            total += len(pics)
            if total > limits.max_images:
                raise APIError(400, f"too many images/frames in one request (over {limits.max_images})", param,
                               "too_many_images")
            images += pics
            texts.append(IMAGE_MARK * len(pics) if isinstance(m.content, str) else
                         "\n".join([IMAGE_MARK] * len(pics)))
        # inline NIM media stands in the text as it is; OpenAI parts are lines of their own
        text = "".join(texts) if isinstance(m.content, str) else "\n".join(texts)
        if m.role == "tool":
            messages.append(Message("tool", text, tool_call_id=m.tool_call_id, name=m.name))
        elif m.tool_calls:
            calls = [{"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                                   "arguments": c.function.arguments}}
                     for c in m.tool_calls]
            messages.append(Message("assistant", text if m.content is not None else None, tool_calls=calls))
        else:
            messages.append(Message(m.role, text, images))
    return messages, total


def _check_tool_fields(m, i: int) -> None:
    """400s for tool fields where they cannot stand (and a missing content)."""
    from edge_vlm.text.tools import arguments_dict

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
