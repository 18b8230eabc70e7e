"""The request and response shapes: OpenAI's chat completions, with NIM VILA's extra field.

pydantic checks every field (types, ranges) and the API page at /docs comes from these models.
Fields that would change the answer but that the runtime cannot honour (n > 1, tools, logprobs,
...) are refused by name; harmless ones clients always send (`user`, `n: 1`) are accepted.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from .errors import APIError

# Fields of OpenAI's API that change the answer and that this server does not implement.
UNSUPPORTED = {
    "tools": "tool calls are not supported", "tool_choice": "tool calls are not supported",
    "functions": "function calls are not supported", "function_call": "function calls are not supported",
    "parallel_tool_calls": "tool calls are not supported",
    "logit_bias": "logit_bias is not supported", "top_logprobs": "logprobs are not supported",
    "audio": "audio output is not supported", "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported", "web_search_options": "web search is not supported",
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class URL(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: URL


class VideoPart(Strict):
    type: Literal["video_url"]
    video_url: URL


Part = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """POST /v1/chat/completions and /v1/vlm/{org}/{name}."""

    model_config = ConfigDict(extra="allow")  # unknown fields are refused by name in `check_fields`

    model: str | None = Field(None, description="the loaded model's id, or any alias of it (e.g. nvidia/vila)")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=-2**63, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    num_frames_per_inference: int = Field(8, ge=1, le=32, description="frames sampled evenly from a video")
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    n: int | None = None
    logprobs: bool | None = None
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    response_format: dict | None = Field(None, description='{"type": "text" | "json_object" | "json_schema", '
                                                           '"json_schema": {"schema": {...}}}')
    nvext: dict | None = Field(None, description="NIM's extensions: guided_json (a JSON schema), guided_choice")

    def check_fields(self) -> None:
        for name in self.model_extra or {}:
            why = UNSUPPORTED.get(name, "unknown field")
            raise APIError(400, f"{name}: {why} by edge-vlm serve", name, "unsupported_field")
        if self.n not in (None, 1):
            raise APIError(400, "n: only n=1 is supported (one answer per request)", "n", "unsupported_value")
        if self.logprobs:
            raise APIError(400, "logprobs: logprobs are not supported", "logprobs", "unsupported_value")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):  # additive penalties are not what the sampler has: refuse, don't approximate
                raise APIError(400, f"{name}: only 0 is supported; use repetition_penalty (multiplicative, "
                                    ">1 makes repeated tokens less likely)", name, "unsupported_value")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise APIError(400, "stop: up to 16 non-empty strings", "stop", "invalid_value")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options: only with stream=true", "stream_options", "invalid_value")

    def constraint(self):
        """What the answer must match (edge_vlm.constrained), from `response_format` or NIM's
        `nvext.guided_json` / `guided_choice`; None for free text. A bad one is a 400 naming its field."""
        from edge_vlm.constrained import Constraint
        from edge_vlm.errors import EdgeVLMError

        ext = dict(self.nvext or {})
        guided = {k: ext.pop(k) for k in ("guided_json", "guided_choice") if k in ext}
        if ext:
            name = next(iter(ext))
            raise APIError(400, f"nvext.{name}: not supported by edge-vlm serve", f"nvext.{name}", "unsupported_field")
        given = [(k, v) for k, v in (("response_format", self.response_format), *guided.items()) if v is not None]
        if self.response_format is not None and self.response_format.get("type") == "text" \
                and set(self.response_format) <= {"type"}:
            given = [(k, v) for k, v in given if k != "response_format"]
        if len(given) > 1:
            raise APIError(400, f"{given[1][0]}: give one of response_format, nvext.guided_json, nvext.guided_choice",
                           given[1][0], "invalid_value")
        if not given:
            return None
        name, spec = given[0]
        if name == "guided_choice" and not (isinstance(spec, list) and all(isinstance(c, str) for c in spec)):
            raise APIError(400, "nvext.guided_choice: a list of strings", "nvext.guided_choice", "invalid_value")
        try:
            return Constraint.parse(spec)
        except EdgeVLMError as e:
            param = name if name == "response_format" else f"nvext.{name}"
            raise APIError(400, f"{param}: {e}", param, "invalid_value") from None

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


FINISH = {"eos": "stop", "stop_string": "stop", "max_new_tokens": "length", "context_full": "length"}


def usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_prompt_tokens}}


def timings(result) -> dict:
    return {"vision_ms": round(result.vision_s * 1000, 2), "ttft_ms": round(result.ttft_s * 1000, 2),
            "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
            "cached_prompt_tokens": result.cached_prompt_tokens}


def completion(cid: str, created: int, model: str, text: str, result) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": FINISH.get(result.stop_reason, "stop"), "logprobs": None}],
            "usage": usage(result), "timings": timings(result)}


def chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
