"""The request and response shapes: OpenAI's chat completions, with NIM VILA's extra field.

pydantic checks the shape of every field (types, required fields) and the OpenAPI schema at
/openapi.json comes from these models. A request becomes the runtime's `GenerationConfig` in one
place, `ChatRequest.to_generation_config` (vLLM's `to_sampling_params` is the pattern), and the
values' ranges are checked there once, by `GenerationConfig` itself, whose error becomes a 400
naming the request's field. Fields that would change the answer but that the runtime cannot
honour (n > 1, logprobs, ...) are refused by name; harmless ones clients always send (`user`,
`n: 1`) are accepted.

Function calling: `tools` and `tool_choice` become a `ToolPlan` (which tools the prompt offers,
whether the answer may, must or must not call one); a forced call is a grammar over the model's
tool-call syntax (edge_vlm.text.constrained). Nemovision's RAG documents come in the top-level
`context` field (a string or a list of strings).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt

from edge_vlm.errors import EdgeVLMError
from edge_vlm.text.constrained import Constraint
from edge_vlm.text.sampling import GenerationConfig, GenerationConfigError
from edge_vlm.text.templates import TOOL_CALL_SYNTAX
from edge_vlm.text.tools import tool_spec, tool_specs

from .errors import APIError

# Fields of OpenAI's API that change the answer and that this server does not implement.
UNSUPPORTED = {
    "functions": "the legacy `functions` are not supported (use `tools`)",
    "function_call": "the legacy `function_call` is not supported (use `tool_choice`)",
    "logit_bias": "logit_bias is not supported", "top_logprobs": "logprobs are not supported",
    "audio": "audio output is not supported", "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported", "web_search_options": "web search is not supported",
}


def _not_bool(value):
    """JSON true is not the number 1 (pydantic's lax mode would take it as one)."""
    if isinstance(value, bool):
        raise ValueError("a number, not true/false")
    return value


Number = Annotated[float, BeforeValidator(_not_bool)]
Int = StrictInt  # JSON integers only: true, "5" and 5.0 are refused
Bool = StrictBool  # JSON true/false only


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


class FunctionCall(Strict):
    name: str
    arguments: str = Field(description="the arguments as a JSON object in text, as OpenAI sends them")


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall
    index: Int | None = None  # what clients that rebuild messages from stream deltas carry along


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[Part] | None = None  # None only for an assistant message with tool_calls
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="assistant messages: the calls it made")
    tool_call_id: str | None = Field(None, description="tool messages: the call whose result this is")
    refusal: None = None  # the openai client's own message objects carry these, always null here
    function_call: None = None
    audio: None = None
    annotations: list | None = None


class StreamOptions(Strict):
    include_usage: Bool = False


class ChatRequest(BaseModel):
    """POST /v1/chat/completions and /v1/vlm/{org}/{name}."""

    model_config = ConfigDict(extra="allow")  # unknown fields are refused by name in `check_fields`

    model: str | None = Field(None, description="the loaded model's id, or any alias of it (e.g. nvidia/vila)")
    messages: list[ChatMessage] = Field(min_length=1)
    # the sampling fields' ranges are GenerationConfig's (see to_generation_config); here only their types
    max_tokens: Int | None = Field(None, description="the answer's length in tokens (at least 1)")
    max_completion_tokens: Int | None = Field(None, description="the same as max_tokens; wins when both are given")
    temperature: Number | None = Field(None, description="0 (greedy) to 2")
    top_p: Number | None = Field(None, description="above 0, at most 1")
    top_k: Int | None = Field(None, description="0 (no limit) or more")
    seed: Int | None = Field(None, description="a signed 64-bit integer: the same seed gives the same answer")
    stop: str | list[str] | None = Field(None, description="up to 16 non-empty strings that end the answer")
    stream: Bool = False
    stream_options: StreamOptions | None = None
    num_frames_per_inference: Int | None = Field(None, ge=1, le=32, description="frames sampled evenly from a video "
                                                 "(default: the model's own, e.g. NVILA's num_video_frames, else 8)")
    repetition_penalty: Number | None = Field(None, description="above 0, at most 10 (1: off)")
    frequency_penalty: Number | None = Field(None, description="only 0 (use repetition_penalty)")
    presence_penalty: Number | None = Field(None, description="only 0 (use repetition_penalty)")
    n: Int | None = None
    logprobs: Bool | None = None
    user: str | None = None
    store: Bool | None = None
    metadata: dict[str, str] | None = None
    response_format: dict | None = Field(None, description='{"type": "text" | "json_object" | "json_schema", '
                                                           '"json_schema": {"schema": {...}}}')
    nvext: dict | None = Field(None, description="NIM's extensions: guided_json (a JSON schema), guided_choice")
    tools: list | None = Field(None, description='functions the model may call: [{"type": "function", "function": '
                                                 '{"name", "description", "parameters": JSON schema}}]')
    tool_choice: str | dict | None = Field(None, description='"auto" (default with tools), "none", "required", or '
                                                             '{"type": "function", "function": {"name": ...}}')
    parallel_tool_calls: Bool | None = Field(None, description="tool_choice required or a named function makes "
                                                               "one call; false with auto is refused")
    context: str | list[str] | None = Field(None, description="RAG documents for the model's context block "
                                                              "(Nemovision's <context>)")

    def check_fields(self, raw=None) -> None:
        """400s for what the field types cannot say: unknown or unsupported fields and values, and
        (in `raw`, the parsed JSON body) text that is not valid Unicode (a lone surrogate such as
        "\\ud800", which JSON can spell but no tokenizer or encoder takes)."""
        where = _bad_text(raw if raw is not None else self.model_dump())
        if where is not None:
            raise APIError(400, f"{where or 'body'}: text with a lone surrogate (invalid Unicode)", where or None,
                           "invalid_unicode")
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
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options: only with stream=true", "stream_options", "invalid_value")

    def to_generation_config(self, defaults: GenerationConfig, plan: "ToolPlan | None" = None) -> GenerationConfig:
        """The answer this request asks for (the one place a request becomes a GenerationConfig):
        each of its length, sampling and stop fields where given, else the server's `defaults`;
        its constraint (response_format / nvext) or, with tools, the one `plan` implies (the
        request's alone: the server has no default constraint). The values are checked by
        GenerationConfig itself; a bad one is a 400 naming the request's field."""

        def given(value, default):
            return default if value is None else value

        constraint = self.constraint() if plan is None else plan.constraint()
        try:
            return GenerationConfig(
                max_new_tokens=given(self.max_completion_tokens, given(self.max_tokens, defaults.max_new_tokens)),
                temperature=given(self.temperature, defaults.temperature), top_p=given(self.top_p, defaults.top_p),
                top_k=given(self.top_k, defaults.top_k),
                repetition_penalty=given(self.repetition_penalty, defaults.repetition_penalty),
                seed=given(self.seed, defaults.seed), stop=list(defaults.stop) if self.stop is None else self.stops,
                constraint=constraint)
        except GenerationConfigError as e:
            param = self.field_of(e.field, plan)
            raise APIError(400, f"{param}: {e.reason}", param, "invalid_value") from None

    def field_of(self, name: str, plan: "ToolPlan | None") -> str:
        """The request's field that a GenerationConfig field came from (where its errors are reported)."""
        if name == "max_new_tokens":
            return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        if name == "constraint":
            return "tools" if plan is not None else self.constraint_field
        return name

    def constraint(self):
        """What the answer must match (edge_vlm.text.constrained), from `response_format` or NIM's
        `nvext.guided_json` / `guided_choice`; None for free text. A bad one is a 400 naming its field."""
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
            param = self.constraint_field
            raise APIError(400, f"{param}: {e}", param, "invalid_value") from None

    @property
    def constraint_field(self) -> str:
        """The field the answer's constraint came from (where its errors are reported)."""
        if self.response_format is not None and self.response_format != {"type": "text"}:
            return "response_format"
        ext = self.nvext or {}
        return "nvext.guided_json" if "guided_json" in ext else "nvext.guided_choice" if "guided_choice" in ext \
            else "nvext"

    def tool_plan(self, fmt: str | None) -> "ToolPlan | None":
        """The request's tools (checked, OpenAI's shape) and what `tool_choice` asks, for a model
        that writes calls in tool format `fmt`; None without tools. A malformed tool, an unknown
        function, tools with response_format: 400s naming the field."""
        if not self.tools:
            if self.tool_choice not in (None, "none"):
                raise APIError(400, "tool_choice: only allowed when tools are given", "tool_choice", "invalid_value")
            if self.parallel_tool_calls is not None:
                raise APIError(400, "parallel_tool_calls: only allowed when tools are given", "parallel_tool_calls",
                               "invalid_value")
            return None
        for i, tool in enumerate(self.tools):
            if isinstance(tool, dict) and "function" not in tool:  # a bare function is not OpenAI's shape
                raise APIError(400, f'tools.{i}: a tool is {{"type": "function", "function": {{"name", '
                                    f'"description", "parameters"}}}}', f"tools.{i}", "invalid_value")
            try:
                tool_spec(tool)
            except EdgeVLMError as e:
                raise APIError(400, f"tools.{i}: {e}", f"tools.{i}", "invalid_value") from None
        try:
            specs = tool_specs(self.tools)
        except EdgeVLMError as e:
            raise APIError(400, f"tools: {e}", "tools", "invalid_value") from None
        names = [t["function"]["name"] for t in specs]
        choice = "auto" if self.tool_choice is None else self.tool_choice
        if isinstance(choice, dict):
            fn = choice.get("function")
            name = fn.get("name") if isinstance(fn, dict) else None
            if choice.get("type") != "function" or set(choice) - {"type", "function"} or not isinstance(name, str):
                raise APIError(400, 'tool_choice: "auto", "none", "required" or {"type": "function", "function": '
                                    '{"name": ...}}', "tool_choice", "invalid_value")
            if name not in names:
                raise APIError(400, f"tool_choice: no tool named {name!r} in tools (they are: {', '.join(names)})",
                               "tool_choice", "unknown_tool")
        elif choice not in ("auto", "none", "required"):
            raise APIError(400, f'tool_choice: "auto", "none", "required" or a named function, not {choice!r}',
                           "tool_choice", "invalid_value")
        if self.parallel_tool_calls is False and choice == "auto":
            raise APIError(400, 'parallel_tool_calls: false is supported with tool_choice "required" or a named '
                                "function (those make exactly one call); with auto the model may write several",
                           "parallel_tool_calls", "unsupported_value")
        for name, value in (("response_format", self.response_format), ("nvext", self.nvext)):
            if value and not (name == "response_format" and value == {"type": "text"}):
                raise APIError(400, f"{name}: cannot be combined with tools (a tool call is itself constrained)",
                               name, "invalid_value")
        return ToolPlan(specs, choice if isinstance(choice, str) else choice["function"]["name"], fmt)

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def _bad_text(value, path: str = "") -> str | None:
    """The dotted path of the first string (or key) in `value` with a lone surrogate, else None."""
    stack = [(value, path)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return at
        elif isinstance(v, dict):
            for k, item in v.items():
                key = f"{at}.{k}" if at else str(k)
                if isinstance(k, str) and _bad_text(k) is not None:
                    return at or ""
                stack.append((item, key))
        elif isinstance(v, list):
            stack += [(item, f"{at}.{i}" if at else str(i)) for i, item in enumerate(v)]
    return None


@dataclass(frozen=True)
class ToolPlan:
    """The tools a request offers and what its answer may do with them. choice: "auto" (the model
    decides; its calls are parsed out of the text), "none" (tools shown as with auto, so the prompt
    and its cache are the same, but the answer is constrained never to open a call), "required"
    (exactly one call, to any of the tools: a small model asked for "one or more" repeats its call
    until max_tokens), or a function's name (one call to it). fmt: the model's tool-call format
    (edge_vlm.text.templates.TOOL_CALL_SYNTAX), the syntax those calls are written in."""

    tools: list
    choice: str
    fmt: str | None

    def constraint(self):
        """The answer's grammar (edge_vlm.text.constrained): a forced call, or no call; None for auto."""
        if self.choice == "auto":
            return None
        if self.choice == "none":
            return Constraint.without(TOOL_CALL_SYNTAX[self.fmt].opening)
        if self.choice == "required":
            return Constraint.tool_calls(self.fmt, self.tools)
        return Constraint.tool_calls(self.fmt, [t for t in self.tools if t["function"]["name"] == self.choice])


class ContentFilter:
    """What of a streamed answer that may call tools is safe to send as `content`: the text before
    the first call's opening tag, less what may still become one (a partial tag at the end) and less
    trailing whitespace (trimmed when a call follows). The rest waits for the parsed reply, so call
    markup never reaches `content`; `rest(final)` is what is left to send of the final content."""

    def __init__(self, opening: str):
        self.opening, self.text, self.sent, self.closed = opening, "", 0, False

    def push(self, piece: str) -> str:
        self.text += piece
        if self.closed:
            return ""
        upto = self.text.find(self.opening)
        if upto >= 0:
            self.closed = True
        else:
            upto = len(self.text)
            for k in range(min(len(self.opening) - 1, len(self.text)), 0, -1):
                if self.text.endswith(self.opening[:k]):
                    upto -= k
                    break
        while upto > self.sent and self.text[upto - 1].isspace():
            upto -= 1
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out

    def rest(self, final: str | None) -> str:
        sent = self.text[:self.sent]
        final = final or ""
        return final[len(sent):] if final.startswith(sent) else ""


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def now() -> int:
    return int(time.time())


FINISH = {"eos": "stop", "stop_string": "stop", "max_new_tokens": "length", "context_full": "length"}


def usage(result) -> dict:
    s = result.stats  # the whole prompt: what came from the KV cache and what ran
    prompt = s.cached_prompt_tokens + s.prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": s.new_tokens, "total_tokens": prompt + s.new_tokens,
            "prompt_tokens_details": {"cached_tokens": s.cached_prompt_tokens}}


def timings(result) -> dict:
    s = result.stats
    return {"vision_ms": round(s.vision_s * 1000, 2), "ttft_ms": round(s.ttft_s * 1000, 2),
            "decode_tokens_per_s": round(s.decode_tokens_per_s, 2), "cached_prompt_tokens": s.cached_prompt_tokens}


def finish_reason(result) -> str:
    return "tool_calls" if result.tool_calls else FINISH.get(result.stats.stop_reason, "stop")


def completion(cid: str, created: int, model: str, text: str | None, result) -> dict:
    message = {"role": "assistant", "content": text}
    if result.tool_calls:
        message["tool_calls"] = [dict(c) for c in result.tool_calls]
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(result), "logprobs": None}],
            "usage": usage(result), "timings": timings(result)}


def call_deltas(calls) -> list[dict]:
    """Stream deltas of tool calls in OpenAI's shape: per call its index, id, type and name (empty
    arguments), then its arguments; clients accumulate them by index."""
    out = []
    for i, c in enumerate(calls):
        out.append({"tool_calls": [{"index": i, "id": c["id"], "type": "function",
                                    "function": {"name": c["function"]["name"], "arguments": ""}}]})
        out.append({"tool_calls": [{"index": i, "function": {"arguments": c["function"]["arguments"]}}]})
    return out


def chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
