"""A multi-turn chat with one model: the glue of the data flow.

media -> preprocessing -> vision tower -> projector -> merged embeddings -> LLM -> sampler -> text stream.
The KV cache keeps every earlier turn, so a new question only runs its own tokens. The session
is the only owner of that state: apps rewind, regenerate, restore and continue conversations
through the methods below, never by touching the cache or the message list.

Function calling and RAG: a session may carry `tools` (OpenAI specs) and `context` (documents
for Nemovision's `<context>` block); both are part of the system turn. After an answer,
`tool_calls` holds the calls parsed from it (OpenAI's structure) and `reply` the assistant
message; results go back with `tool_result` and the model answers them in `resume`, or a whole
conversation with `role: "tool"` messages goes to `chat`.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from PIL import Image

from .text.templates import _ANSWER_SENTINEL, IMAGE_MARK
from .errors import ContextOverflowError, EdgeVLMError
from .text.tools import arguments_dict, parse_tool_calls, result_text, template_call, tool_specs
from .generate import AnswerText, GenerationConfig, GenerationStats, generate
from .contracts import Prompt
from .imaging.preprocess import load_image
from .imaging.video import sample_frames
from .vlm import VisionLanguageModel

_KEEP = object()  # reset(): keep the current system prompt


@dataclass
class Turn:
    """One question (and/or tool results) and its answer, with where the turn starts in the KV cache."""

    question: str | None  # the user message as the template sees it (images as <image> marks); None: tool results only
    images: list[Image.Image]  # decoded once, kept for regenerate()
    answer: str  # the model's text as generated (tool-call blocks included)
    start: int  # cache position before the question's tokens
    pending_before: list[int]  # sampled-but-unfed tokens of the turn before (they lead this prompt)
    tool_results: tuple[dict, ...] = ()  # role "tool" messages before the question
    tool_calls: list[dict] = field(default_factory=list)  # parsed from the answer (OpenAI's structure)
    _image_keys: tuple[str, ...] | None = field(default=None, repr=False)

    @property
    def inputs(self) -> list[dict]:
        """The template messages this turn adds before its answer."""
        user = [] if self.question is None else [{"role": "user", "content": self.question}]
        return list(self.tool_results) + user

    @property
    def image_keys(self) -> tuple[str, ...]:
        if self._image_keys is None:
            self._image_keys = tuple(image_key(im) for im in self.images)
        return self._image_keys


@dataclass
class Message:
    """A message of a whole conversation handed to `ChatSession.chat` (the server's request shape)."""

    role: str  # system | user | assistant | tool
    content: str | None  # text; images of a user message go where <image> marks stand, or before the text
    images: Sequence = ()  # paths, PIL images or RGB arrays (user messages only)
    tool_calls: Sequence[dict] = ()  # assistant messages: OpenAI tool calls (arguments a JSON string or a dict)
    tool_call_id: str | None = None  # tool messages: the call they answer
    name: str | None = None  # tool messages: the function's name (optional)


def image_key(image: Image.Image) -> str:
    """Content hash of a decoded image: equal pixels, equal key (matches resent images)."""
    h = hashlib.sha256(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
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


class ChatSession:
    def __init__(self, model: VisionLanguageModel, system: str | None = None, max_context: int | None = None,
                 tools: Sequence[dict] | None = None, context=None, engine=None):
        """`engine`: run on this prefill/step engine (e.g. one slot of a batched llama.cpp
        context, the server's --parallel) instead of a fresh one of the model's."""
        self.model = model
        self.system = system
        self._set_tools(tools, context)
        self.engine = engine if engine is not None else model.new_engine(max_context)  # CUDA graphs, or llama.cpp
        self._turns: list[Turn] = []
        self._pending: list[int] = []  # sampled tokens not yet fed to the model (lead the next prompt)
        self._results: list[dict] = []  # tool results given since the last answer, not yet asked
        self.stats = GenerationStats()

    def _set_tools(self, tools, context) -> None:
        specs, docs = tool_specs(tools), documents(context)
        self.model.template.check_tools(specs, docs)
        self.tools, self.documents = specs, docs

    # ---- state -------------------------------------------------------------------------

    @property
    def turns(self) -> list[Turn]:
        """The conversation so far (a copy: change it through rewind/restore/chat)."""
        return list(self._turns)

    @property
    def messages(self) -> list[dict]:
        """The conversation as chat-template messages (without the system prompt)."""
        out = []
        for t in self._turns:
            out += t.inputs + [{"role": "assistant", "content": t.answer}]
        return out

    @property
    def tool_calls(self) -> list[dict]:
        """The tool calls of the last answer (OpenAI's structure; empty without tools)."""
        return list(self._turns[-1].tool_calls) if self._turns else []

    @property
    def reply(self) -> dict | None:
        """The last answer as an OpenAI assistant message: `content` (None when only calls are
        left) and, when it called tools, `tool_calls`."""
        return _reply(self._turns[-1], self.model.template.tool_format) if self._turns else None

    @property
    def position(self) -> int:
        """Tokens of the conversation in the KV cache."""
        return self.engine.position

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def reset(self, system=_KEEP, tools=_KEEP, context=_KEEP) -> None:
        """Start a new conversation (the cache buffers are reused); optionally a new system prompt,
        tools or context."""
        if tools is not _KEEP or context is not _KEEP:
            self._set_tools(self.tools if tools is _KEEP else tools, self.documents if context is _KEEP else context)
        if system is not _KEEP:
            self.system = system
        self.rewind(0)
        self._results = []

    def rewind(self, turns: int) -> None:
        """Keep only the first `turns` turns: the cache, the messages and the unfed tokens go back
        to how they were before turn `turns` was asked."""
        if turns < 0 or turns > len(self._turns):
            raise ValueError(f"cannot rewind to turn {turns}: the conversation has {len(self._turns)}")
        if turns == len(self._turns):
            return
        cut = self._turns[turns] if turns else None
        self.engine.rewind(cut.start if cut else 0)
        self._pending = list(cut.pending_before) if cut else []
        del self._turns[turns:]
        self._results = []

    # ---- prompt building -------------------------------------------------------------

    def _user_content(self, text: str | None, n_images: int) -> str | None:
        if text is None:
            if n_images:
                raise EdgeVLMError("images need a question: a turn of tool results alone cannot carry them")
            return None
        marks = text.count(IMAGE_MARK)
        if marks and marks != n_images:
            raise EdgeVLMError(f"the question has {marks} {IMAGE_MARK} marks but {n_images} images were given")
        return text if marks else (IMAGE_MARK + self.model.image_mark_suffix) * n_images + text

    def _head(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def _prompt_chunks(self, new: list[dict], tiles: Sequence[int] = ()) -> list[list[int]]:
        """Token-id chunks of the next prompt (the unfed tokens first), to interleave with the
        encoded pictures; `new` are the turn's messages (tool results, the user's question);
        `tiles[i]` is how many tiles picture i takes (tiled models)."""
        # every text of the messages, tools and documents is quoted: only the template's markup
        # becomes control tokens, never "<|im_end|>" written by a user or a tool (tokenizer.py)
        tok = self.model.tokenizer
        tpl, kw = self.model.template, {"tools": tok.quote(self.tools), "documents": tok.quote(self.documents)}
        if not self._turns:
            text = tpl.render(tok.quote(self._head() + new), **kw)
        else:
            text = tpl.continuation(tok.quote(self.messages), tok.quote(new), **kw)
        pieces = text.split(IMAGE_MARK)
        if self.model.tiling is not None and len(pieces) > 1:  # each picture's mark -> its tiles' marks
            alone = len(tiles) == 1
            text = pieces[0] + "".join(self.model.image_text(n, alone) + rest for n, rest in zip(tiles, pieces[1:]))
            pieces = text.split(IMAGE_MARK)
        chunks = [tok.encode_prompt(c) for c in pieces]
        start, end = self.model.image_wrap_ids  # token ids around each image (NVILA-era VILA)
        chunks = [(end if i else []) + c + (start if i < len(chunks) - 1 else []) for i, c in enumerate(chunks)]
        chunks[0] = self._pending + chunks[0]
        return chunks

    def _question(self, text: str | None, pictures, results: Sequence[dict] = ()) -> tuple[str, list[list[int]], int]:
        """(user content, prompt chunks, tokens needed) for a question with `pictures` (decoded
        images, or only their number: then tiled models count the most tiles a picture can take),
        after the tool `results`."""
        n_images = pictures if isinstance(pictures, int) else len(pictures)
        if n_images and not self.model.is_multimodal:
            raise EdgeVLMError("this model is text-only: it cannot take images or video")
        content = self._user_content(text, n_images)
        if content is None and not results:
            raise EdgeVLMError("nothing to answer: no question and no tool results")
        tiles = self.model.mark_counts(pictures)
        user = [] if content is None else [{"role": "user", "content": content}]
        chunks = self._prompt_chunks(list(results) + user, tiles)
        return content, chunks, sum(len(c) for c in chunks) + self.model.image_tokens(pictures)

    def tokens_needed(self, text: str, n_images: int = 0, images=None) -> int:
        """How many context tokens asking `text` with `n_images` images (or video frames) takes now.
        Tiled models (InternVL, NVLM-D) count each image at its most tiles unless `images` (the
        images themselves) are given."""
        if images is not None:
            return self._question(text, [load_image(im) for im in images], self._results)[2]
        return self._question(text, n_images, self._results)[2]

    def _check_fits(self, need: int, n_images: int) -> None:
        free = self.max_context - self.position
        if need + 1 > free:
            per = "tokens per tile" if self.model.tiling is not None else "tokens"
            what = f" ({n_images} images x {self.model.tokens_per_image} {per})" if n_images else ""
            raise ContextOverflowError(
                f"prompt needs {need} tokens{what} but only {free - 1} fit in the context "
                f"({self.max_context} tokens, {self.position} used by earlier turns): "
                f"over by {need + 1 - free}; shorten it, use fewer images/frames, /reset, or raise --max-context")

    def _prompt(self, chunks: list[list[int]], images: list[Image.Image]) -> Prompt:
        tiles = self.model.message_tiles(images)  # tiled models: every tile
        return Prompt(chunks, self.model.encode_images(tiles) if tiles else None)

    def _pictures(self, images, video, frames: int) -> list[Image.Image]:
        pictures = [load_image(im) for im in images]  # each image is decoded here, once
        if video is not None:
            pictures += [self.model.mark_video_frame(f) for f in sample_frames(video, frames)]
        return pictures

    # ---- asking ------------------------------------------------------------------------

    def ask(self, text: str, images=(), video=None, frames: int = 8, gen: GenerationConfig | None = None,
            stop_event: threading.Event | None = None) -> Iterator[str]:
        """Stream the answer to `text` about `images` (paths, PIL images or arrays) and/or a video
        (tool results given with `tool_result` go first)."""
        t0 = time.perf_counter()
        return self._ask(text, self._pictures(images, video, frames), gen, stop_event, t0, results=self._results)

    def tool_result(self, call: str, content) -> None:
        """Give the result of one of the last answer's tool calls (its id, or its function's name);
        `resume` (or the next `ask`) sends the results to the model as their own turn."""
        calls = self.tool_calls
        if not calls:
            raise EdgeVLMError("the last answer called no tools")
        answered = {r["tool_call_id"] for r in self._results}
        match = [c for c in calls if c["id"] == call] or \
                [c for c in calls if c["function"]["name"] == call and c["id"] not in answered]
        if not match:
            known = ", ".join(f"{c['id']} ({c['function']['name']})" for c in calls)
            raise EdgeVLMError(f"no tool call {call!r} in the last answer; its calls: {known}")
        c = match[0]
        self._results = [r for r in self._results if r["tool_call_id"] != c["id"]] + [
            {"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"], "content": result_text(content)}]

    def resume(self, gen: GenerationConfig | None = None, stop_event: threading.Event | None = None) -> Iterator[str]:
        """Stream the model's answer to the tool results given since its last answer."""
        if not self._results:
            raise EdgeVLMError("no tool results to answer: give them with tool_result(call, content)")
        return self._ask(None, [], gen, stop_event, time.perf_counter(), results=self._results)

    def _ask(self, text: str | None, pictures: list[Image.Image], gen: GenerationConfig | None,
             stop_event: threading.Event | None, t0: float, cached: int | None = None,
             results: Sequence[dict] = ()) -> Iterator[str]:
        gen = gen or GenerationConfig()
        results = tuple(results)
        content, chunks, need = self._question(text, pictures, results)
        self._check_fits(need, len(pictures))
        prompt = self._prompt(chunks, pictures)
        turn = Turn(content, pictures, "", self.position, self._pending, results)
        self._pending = []
        self._results = []
        self.stats = GenerationStats(cached_prompt_tokens=self.position if cached is None else cached,
                                     backend=self.engine.name,
                                     vision_backend=self.model.info.vision_backend if self.model.is_multimodal else "")
        answer = AnswerText(self.model.tokenizer, self.model.eos_token_ids,
                            list(gen.stop) + self.model.template.stop_strings)
        prompt_end = self.position + len(prompt)
        self._turns.append(turn)
        try:
            yield from generate(self.engine, prompt, gen, answer, stop_event, self.stats, t0)
        finally:
            if self.position < prompt_end:  # the prompt never reached the cache (prefill failed): no turn
                self._turns.pop()
                self.engine.rewind(turn.start)
                self._pending = turn.pending_before
                self._results = list(results)
            else:  # the answer so far stays in the conversation, also when the consumer stops early
                self._pending = answer.tokens[self.position - prompt_end:]  # sampled, never fed: leads the next prompt
                turn.answer = answer.text
                if self.tools:
                    turn.tool_calls = parse_tool_calls(answer.text, self.model.template.tool_format)[1]

    def answer(self, text: str, **kw) -> str:
        """The whole answer as one string (non-streaming convenience)."""
        return "".join(self.ask(text, **kw))

    def regenerate(self, gen: GenerationConfig | None = None,
                   stop_event: threading.Event | None = None) -> Iterator[str]:
        """Forget the last answer and answer its question (with its images) again."""
        if not self._turns:
            raise EdgeVLMError("nothing to regenerate: no question has been asked yet")
        last = self._turns[-1]
        self.rewind(len(self._turns) - 1)
        return self._ask(last.question, last.images, gen, stop_event, time.perf_counter(), results=last.tool_results)

    def restore(self, exchanges: Sequence[tuple[str, Sequence, str]], system=_KEEP) -> None:
        """Put a saved conversation, [(question, images, answer), ...], back into the context so
        it can be continued: each question is prefilled as if just asked, and its saved answer
        goes in as the tokens the model "sampled". Nothing is generated. If it does not fit, the
        session is left empty and ContextOverflowError says so."""
        self.reset(system)
        try:
            for question, images, answer in exchanges:
                self._prefill_exchange(question, self._pictures(images, None, 0), answer)
        except BaseException:
            self.reset()
            raise

    def _prefill_exchange(self, question: str | None, pictures: list[Image.Image], answer: str,
                          results: Sequence[dict] = (), calls: Sequence[dict] = ()) -> None:
        """Prefill one saved exchange; an answer that called tools (`calls`, with `answer` the text
        beside them) goes in as the template writes such a message."""
        content, chunks, need = self._question(question, pictures, results)
        if need + 1 > self.max_context - self.position:
            raise ContextOverflowError(f"the conversation is longer than the context ({self.max_context} tokens)")
        user = [] if content is None else [{"role": "user", "content": content}]
        text = self._answer_text(list(results) + user, answer, calls) if calls else answer
        turn = Turn(content, pictures, text, self.position, self._pending, tuple(results), [dict(c) for c in calls])
        self.engine.prefill(self._prompt(chunks, pictures))
        tok = self.model.tokenizer  # the client's text as plain text; with calls, the template's markup around it
        self._pending = tok.encode_prompt(self._answer_text(tok.quote(list(results) + user), tok.quote(answer),
                                                            tok.quote(calls))) if calls else tok.encode_text(answer)
        self._turns.append(turn)

    def _answer_text(self, new: list[dict], content: str | None, calls: Sequence[dict]) -> str:
        """The text the template writes for an assistant message with tool calls after `new`
        (what the model would have generated): the whole render with that message, less the
        prompt before it and the end-of-turn text after it."""
        tpl, kw = self.model.template, {"tools": self.tools, "documents": self.documents}
        before = self._head() + self.messages + new
        msg = {"role": "assistant", "content": content or None, "tool_calls": [template_call(c) for c in calls]}
        full = tpl.render(before + [msg], add_generation_prompt=False, **kw)
        prompt = tpl.render(before, add_generation_prompt=True, **kw)
        marked = tpl.render(before + [{"role": "assistant", "content": _ANSWER_SENTINEL}], add_generation_prompt=False, **kw)
        end = marked[marked.rfind(_ANSWER_SENTINEL) + len(_ANSWER_SENTINEL):]
        if not (full.startswith(prompt) and full.endswith(end)) or len(full) < len(prompt) + len(end):
            raise EdgeVLMError(f"chat template {tpl.name!r} does not write tool calls after its assistant prompt")
        return full[len(prompt):len(full) - len(end)].strip()

    def chat(self, messages: Sequence[Message], gen: GenerationConfig | None = None,
             stop_event: threading.Event | None = None, tools=_KEEP, context=_KEEP) -> Iterator[str]:
        """Answer the last (user or tool) message of a whole conversation, reusing the cache.

        When `messages` extend the conversation already in the cache (same system prompt, tools
        and context, same earlier questions, images, tool results and answers), only the new part
        is run; otherwise the session keeps the longest shared prefix of turns and runs the rest.
        `stats.cached_prompt_tokens` says how many prompt tokens came from the cache. Assistant
        messages may carry `tool_calls` and `role: "tool"` messages their results (OpenAI's
        shapes); `tools` / `context` replace the session's (the default keeps them).
        """
        t0 = time.perf_counter()
        system, exchanges, (question, pictures, results) = _split_conversation(messages)
        if (results or any(e[2] or e[4] for e in exchanges)) and self.model.template.tool_format is None:
            self.model.template.check_tools([{}], [])  # says why this template has no tool format
        new_tools = self.tools if tools is _KEEP else tool_specs(tools)
        new_docs = self.documents if context is _KEEP else documents(context)
        if system != self.system or new_tools != self.tools or new_docs != self.documents:
            self.reset(system, new_tools, new_docs)
        fmt = self.model.template.tool_format
        keep = 0
        for turn, (q, pics, res, a, calls) in zip(self._turns, exchanges):
            if turn.question != self._user_content(q, len(pics)) or turn.image_keys != tuple(image_key(p) for p in pics) \
                    or _results_key(turn.tool_results) != _results_key(res) \
                    or not _same_answer(turn, a, calls, fmt):
                break
            keep += 1
        self.rewind(keep)
        cached = self.position
        try:
            for q, pics, res, a, calls in exchanges[keep:]:
                self._prefill_exchange(q, pics, a, res, calls)
        except BaseException:
            self.rewind(keep)
            raise
        return self._ask(question, pictures, gen, stop_event, t0, cached, results)


def _reply(turn: Turn, fmt: str | None) -> dict:
    content = turn.answer
    if turn.tool_calls and fmt is not None:
        content = parse_tool_calls(turn.answer, fmt)[0]
    out = {"role": "assistant", "content": content if content or not turn.tool_calls else None}
    if turn.tool_calls:
        out["tool_calls"] = [dict(c) for c in turn.tool_calls]
    return out


def _calls_key(calls) -> list:
    return [(c.get("id"), c.get("function", c)["name"], arguments_dict(c)) for c in calls]


def _results_key(results) -> list:
    return [(r.get("tool_call_id"), r["content"]) for r in results]


def _same_answer(turn: Turn, content: str | None, calls, fmt) -> bool:
    """Whether an assistant message of the client is the answer this turn holds (its text, or
    the reply we gave: text beside the calls, and the calls with their ids)."""
    if not calls:
        return not turn.tool_calls and turn.answer == (content or "")
    mine = _reply(turn, fmt)
    return (mine["content"] or "") == (content or "") and _calls_key(mine.get("tool_calls", [])) == _calls_key(calls)


def _tool_message(m: Message) -> dict:
    if not m.tool_call_id:
        raise EdgeVLMError("a tool message needs the tool_call_id of the call it answers")
    if m.images:
        raise EdgeVLMError("only user messages can carry images")
    out = {"role": "tool", "tool_call_id": m.tool_call_id, "content": result_text(m.content or "")}
    if m.name:
        out["name"] = m.name
    return out


def _split_conversation(messages: Sequence[Message]):
    """(system, [(question, pictures, tool results, answer, its tool calls), ...],
    (last question, its pictures, tool results before it)). A turn's input is zero or more tool
    messages and then at most one user message; an assistant message ends it."""
    msgs = list(messages)
    system = None
    if msgs and msgs[0].role == "system":
        system, msgs = msgs[0].content, msgs[1:]
    if not msgs or msgs[-1].role not in ("user", "tool"):
        raise EdgeVLMError("the conversation must end with a user message (or tool results)")
    exchanges, results, user = [], [], None
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
            exchanges.append((None if user is None else user.content,
                              [] if user is None else [load_image(im) for im in user.images],
                              tuple(results), m.content or "", list(m.tool_calls)))
            results, user = [], None
        else:
            raise EdgeVLMError(f"unknown message role {m.role!r} ({where}); known: system, user, assistant, tool")
    return system, exchanges, (None if user is None else user.content,
                               [] if user is None else [load_image(im) for im in user.images], tuple(results))
