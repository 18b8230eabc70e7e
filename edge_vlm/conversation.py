"""A conversation as a value: its exchanges, and the pure functions the session runs them with.

An `Exchange` is one turn (a question and/or tool results, and the answer) with where it sits in
the KV cache. A client's whole history (OpenAI messages, the server's request) is read into a
`History` of `Sent` turns; `shared_turns` says how many of them are the exchanges already in the
cache, so only the rest is run. Nothing here touches a model: `ChatSession` (session.py) does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

from PIL import Image

from .errors import EdgeVLMError
from .imaging.preprocess import load_image
from .imaging.video import FRAME_POOL, frames_of, picture_info
from .text.templates import IMAGE_MARK
from .text.tools import arguments_dict, parse_tool_calls, result_text


@dataclass(frozen=True)
class Exchange:
    """One question (and/or tool results) and its answer, with where it starts in the KV cache."""

    question: str | None  # the user message as the template sees it (images as <image> marks); None: tool results only
    images: tuple[Image.Image, ...]  # decoded once, kept for regenerate()
    answer: str  # the model's text as generated (tool-call blocks included)
    start: int  # cache position before the question's tokens
    pending_before: tuple[int, ...]  # sampled-but-unfed tokens of the exchange before (they lead this prompt)
    tool_results: tuple[dict, ...] = ()  # role "tool" messages before the question
    tool_calls: tuple[dict, ...] = ()  # parsed from the answer (OpenAI's structure)

    @property
    def inputs(self) -> list[dict]:
        """The template messages this exchange adds before its answer."""
        user = [] if self.question is None else [{"role": "user", "content": self.question}]
        return list(self.tool_results) + user

    @cached_property
    def image_keys(self) -> tuple[str, ...]:
        return tuple(image_key(im) for im in self.images)


@dataclass
class Message:
    """A message of a whole conversation handed to `ChatSession.chat` (the server's request shape)."""

    role: str  # system | user | assistant | tool
    content: str | None  # text; images of a user message go where <image> marks stand, or before the text
    images: Sequence = ()  # paths, PIL images or RGB arrays (user messages only)
    tool_calls: Sequence[dict] = ()  # assistant messages: OpenAI tool calls (arguments a JSON string or a dict)
    tool_call_id: str | None = None  # tool messages: the call they answer
    name: str | None = None  # tool messages: the function's name (optional)


@dataclass(frozen=True)
class Sent:
    """One turn of a client's history: tool results, then at most one user message, then the
    assistant's answer (none yet for the turn to answer now)."""

    question: str | None  # the user's text as sent (None: tool results only)
    pictures: tuple[Image.Image, ...]  # decoded
    tool_results: tuple[dict, ...]  # role "tool" template messages
    answer: str = ""
    tool_calls: tuple[dict, ...] = ()  # of the answer, as the client sent them


@dataclass(frozen=True)
class History:
    """A client's whole conversation: its system prompt, the answered turns, the turn to answer."""

    system: str | None
    answered: tuple[Sent, ...]
    question: Sent

    @property
    def uses_tools(self) -> bool:
        return bool(self.question.tool_results) or any(s.tool_results or s.tool_calls for s in self.answered)


def image_key(image: Image.Image) -> str:
    """Content hash of a decoded image: equal pixels, equal key (matches resent images); a pooled run of video
    frames hashes every frame it stands for and its pool."""
    h = hashlib.sha256(f"{image.mode}{image.size}".encode())
    frames = frames_of(image)
    if len(frames) > 1 or frames[0] is not image:
        h.update(f"{len(frames)} frames pooled {picture_info(image).get(FRAME_POOL)}".encode())
    for frame in frames:
        h.update(frame.tobytes())
    return h.hexdigest()


def documents(context) -> list[dict]:
    """RAG context as template documents: a string or a list of strings (or {"text": ...})."""
    if not context:
        return []
    items = [context] if isinstance(context, (str, dict)) else list(context)
    out = []
    for d in items:
        text = d.get("text") if isinstance(d, dict) else d
        if not isinstance(text, str):
            raise EdgeVLMError("context documents must be strings (or {\"text\": ...})")
        out.append({"text": text})
    return out


def user_content(text: str | None, n_images: int, mark_suffix: str) -> str | None:
    """The user message as the template sees it: the text with one <image> mark per picture (where
    the user put them, else before the text, each followed by `mark_suffix`); None for no text."""
    if text is None:
        if n_images:
            raise EdgeVLMError("images need a question: a turn of tool results alone cannot carry them")
        return None
    marks = text.count(IMAGE_MARK)
    if marks and marks != n_images:
        raise EdgeVLMError(f"the question has {marks} {IMAGE_MARK} marks but {n_images} images were given")
    return text if marks else (IMAGE_MARK + mark_suffix) * n_images + text


def template_messages(exchanges: Sequence[Exchange]) -> list[dict]:
    """The conversation as chat-template messages (without the system prompt)."""
    out = []
    for e in exchanges:
        out += e.inputs + [{"role": "assistant", "content": e.answer}]
    return out


def reply(exchange: Exchange, fmt: str | None) -> dict:
    """The exchange's answer as an OpenAI assistant message: `content` (None when only calls are
    left) and, when it called tools, `tool_calls`; `fmt` is the template's tool-call format."""
    content = exchange.answer
    if exchange.tool_calls and fmt is not None:
        content = parse_tool_calls(exchange.answer, fmt)[0]
    out = {"role": "assistant", "content": content if content or not exchange.tool_calls else None}
    if exchange.tool_calls:
        out["tool_calls"] = [dict(c) for c in exchange.tool_calls]
    return out


def _calls_key(calls) -> list:
    return [(c.get("id"), c.get("function", c)["name"], arguments_dict(c)) for c in calls]


def _results_key(results) -> list:
    return [(r.get("tool_call_id"), r["content"]) for r in results]


def same_answer(exchange: Exchange, content: str | None, calls, fmt: str | None) -> bool:
    """Whether an assistant message of the client is the answer this exchange holds (its text, or
    the reply we gave: text beside the calls, and the calls with their ids)."""
    if not calls:
        return not exchange.tool_calls and exchange.answer == (content or "")
    mine = reply(exchange, fmt)
    return (mine["content"] or "") == (content or "") and _calls_key(mine.get("tool_calls", [])) == _calls_key(calls)


def same_turn(exchange: Exchange, sent: Sent, mark_suffix: str, fmt: str | None) -> bool:
    """Whether the client's turn is this exchange: the same question, pictures, tool results and answer."""
    return (exchange.question == user_content(sent.question, len(sent.pictures), mark_suffix)
            and exchange.image_keys == tuple(image_key(p) for p in sent.pictures)
            and _results_key(exchange.tool_results) == _results_key(sent.tool_results)
            and same_answer(exchange, sent.answer, sent.tool_calls, fmt))


def shared_turns(exchanges: Sequence[Exchange], answered: Sequence[Sent], mark_suffix: str,
                 fmt: str | None) -> int:
    """How many leading exchanges the client's answered turns repeat (those stay in the cache)."""
    keep = 0
    for exchange, sent in zip(exchanges, answered):
        if not same_turn(exchange, sent, mark_suffix, fmt):
            break
        keep += 1
    return keep


def _tool_message(m: Message) -> dict:
    if not m.tool_call_id:
        raise EdgeVLMError("a tool message needs the tool_call_id of the call it answers")
    if m.images:
        raise EdgeVLMError("only user messages can carry images")
    out = {"role": "tool", "tool_call_id": m.tool_call_id, "content": result_text(m.content or "")}
    if m.name:
        out["name"] = m.name
    return out


def _sent(user: Message | None, results: list[dict], answer: Message | None = None) -> Sent:
    return Sent(None if user is None else user.content,
                () if user is None else tuple(load_image(im) for im in user.images), tuple(results),
                "" if answer is None else answer.content or "", () if answer is None else tuple(answer.tool_calls))


def split_conversation(messages: Sequence[Message]) -> History:
    """Read a client's messages into turns. A turn's input is zero or more tool messages and then at
    most one user message; an assistant message ends it; the last turn has no answer yet."""
    msgs = list(messages)
    system = None
    if msgs and msgs[0].role == "system":
        system, msgs = msgs[0].content, msgs[1:]
    if not msgs or msgs[-1].role not in ("user", "tool"):
        raise EdgeVLMError("the conversation must end with a user message (or tool results)")
    answered, results, user = [], [], None
    for i, m in enumerate(msgs):
        where = f"message {i + 1 + (system is not None)}"
        if m.role == "tool":
            if user is not None:
                raise EdgeVLMError(f"tool results must come before the user's message in a turn ({where})")
            results.append(_tool_message(m))
        elif m.role == "user":
            if user is not None:
                raise EdgeVLMError("messages after the system prompt must alternate user, assistant, ..., user "
                                   f"({where} is 'user', after 'user')")
            user = m
        elif m.role == "assistant":
            if user is None and not results:
                prev = msgs[i - 1].role if i else "the system prompt"
                raise EdgeVLMError("messages after the system prompt must alternate user, assistant, ..., user "
                                   f"({where} is 'assistant', after {prev!r})")
            if m.images:
                raise EdgeVLMError("only user messages can carry images")
            answered.append(_sent(user, results, m))
            results, user = [], None
        else:
            raise EdgeVLMError(f"unknown message role {m.role!r} ({where}); known: system, user, assistant, tool")
    return History(system, tuple(answered), _sent(user, results))
