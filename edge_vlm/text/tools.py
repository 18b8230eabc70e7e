"""Function calling: tool specs, tool calls parsed out of model text, tool results.

Everything is in OpenAI's shapes, which the chat templates, the session and the server share:

- a tool spec: `{"type": "function", "function": {"name", "description", "parameters"}}`;
- a tool call: `{"id", "type": "function", "function": {"name", "arguments": JSON string}}`;
- a tool result: a `role: "tool"` message whose content is text (`result_text`).

Models write calls in their template's own syntax (`templates.TOOL_CALL_SYNTAX`): Nemovision
`<toolcall> {"name": ..., "arguments": {...}} </toolcall>`, Qwen2 / Hermes
`<tool_call>\\n{...}\\n</tool_call>`. A block that is not a JSON object with a string `name` (and
an object of arguments) is no call: it stays in the answer's text, so nothing half-parsed is
ever executed.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any, Sequence

from .templates import TOOL_CALL_SYNTAX
from ..errors import EdgeVLMError

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def tool_spec(tool: dict) -> dict:
    """A tool in OpenAI's shape, checked (a bare `{"name", ...}` function is wrapped)."""
    if not isinstance(tool, dict):
        raise EdgeVLMError(f"a tool must be a dict in OpenAI's shape, got {type(tool).__name__}")
    if "function" not in tool and "name" in tool:
        tool = {"type": "function", "function": tool}
    fn = tool.get("function")
    if tool.get("type", "function") != "function" or not isinstance(fn, dict):
        raise EdgeVLMError('a tool must be {"type": "function", "function": {"name", "description", "parameters"}}')
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise EdgeVLMError(f"tool name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict):
        raise EdgeVLMError(f"the parameters of tool {name!r} must be a JSON schema object")
    out = {"name": name}
    if fn.get("description") is not None:
        out["description"] = str(fn["description"])
    out["parameters"] = params
    return {"type": "function", "function": out}


def tool_specs(tools: Sequence[dict] | None) -> list[dict]:
    """Every tool checked and in OpenAI's shape; names must be unique."""
    specs = [tool_spec(t) for t in tools or ()]
    names = [s["function"]["name"] for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EdgeVLMError(f"tool names must be unique: {', '.join(dup)} given more than once")
    return specs


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def tool_call(name: str, arguments: dict | str, call_id: str | None = None) -> dict:
    """One call in OpenAI's structure (arguments as a JSON string)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id or new_call_id(), "type": "function", "function": {"name": name, "arguments": args}}


def _as_call(obj: Any) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return tool_call(obj["name"], args)


def parse_tool_calls(text: str, fmt: str) -> tuple[str, list[dict]]:
    """(the text left, the calls) of a model answer written in tool-call syntax `fmt`.

    Each well-formed block becomes a call and leaves the text; a block holding a JSON list of
    calls gives each of them; a malformed or unclosed block stays in the text as it was.
    """
    if fmt not in TOOL_CALL_SYNTAX:
        raise EdgeVLMError(f"unknown tool-call format {fmt!r}; known: {', '.join(TOOL_CALL_SYNTAX)}")
    opening, closing = TOOL_CALL_SYNTAX[fmt].opening, TOOL_CALL_SYNTAX[fmt].closing
    pattern = re.compile(re.escape(opening) + r"(.*?)" + re.escape(closing), re.DOTALL)
    calls: list[dict] = []
    kept: list[str] = []
    at = 0
    for m in pattern.finditer(text):
        try:
            body = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue  # stays in the text
        found = [_as_call(o) for o in (body if isinstance(body, list) else [body])]
        if not found or any(c is None for c in found):
            continue
        kept.append(text[at:m.start()])
        at = m.end()
        calls += found
    kept.append(text[at:])
    left = "".join(kept)
    return (left.strip() if calls else text), calls


def arguments_dict(call: dict) -> dict:
    """A call's arguments as a dict (templates take them so; OpenAI sends a JSON string)."""
    args = call.get("function", call).get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise EdgeVLMError(f"tool call arguments are not JSON: {args[:80]!r}") from None
    if not isinstance(args, dict):
        raise EdgeVLMError("tool call arguments must be a JSON object")
    return args


def template_call(call: dict) -> dict:
    """A call as chat templates take it: OpenAI's structure with the arguments as a dict."""
    fn = call.get("function", call)
    return {"id": call.get("id"), "type": "function",
            "function": {"name": fn["name"], "arguments": arguments_dict(call)}}


def result_text(content: Any) -> str:
    """The text of a tool result turn: strings as they are, anything else as JSON."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text", "") for p in content)  # OpenAI content parts
    return json.dumps(content, ensure_ascii=False)
