"""A multi-turn chat with one model: the glue of the data flow.

media -> preprocessing -> vision tower -> projector -> merged embeddings -> LLM -> sampler -> text stream.
The KV cache keeps every earlier turn, so a new question only runs its own tokens. The session
is the only owner of that state: apps rewind, regenerate, restore and continue conversations
through the methods below, never by touching the cache or the exchanges. The conversation
itself is a value (conversation.py: its `Exchange`s and the pure functions over them); the
session builds the prompts and runs them.

Function calling and RAG: a session may carry `tools` (OpenAI specs) and `context` (documents
for Nemovision's `<context>` block); both are part of the system turn. After an answer,
`tool_calls` holds the calls parsed from it (OpenAI's structure) and `reply` the assistant
message; results go back with `tool_result` and the model answers them in `resume`, or a whole
conversation with `role: "tool"` messages goes to `chat`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Iterator, NamedTuple, Sequence

from PIL import Image

from .contracts import KEEP, GenerationStats, ImageEncoder, Keep, Prompt
from .conversation import (Exchange, Message, documents, reply, shared_turns, split_conversation,
                           template_messages, user_content)
from .errors import ContextOverflowError, EdgeVLMError
from .generate import AnswerText, GenerationConfig, generate
from .imaging.preprocess import load_image
from .imaging.video import sample_frames
from .text.templates import ANSWER_SENTINEL, IMAGE_MARK
from .text.tools import parse_tool_calls, result_text, template_call, tool_specs
from .vlm import VisionLanguageModel

__all__ = ["ChatSession", "Message"]


class _Question(NamedTuple):
    """A question's prompt before its pictures are encoded."""

    content: str | None  # the user message as the template sees it (None: tool results only)
    chunks: list[list[int]]  # token ids, one chunk before each picture and one after the last
    need: int  # context tokens it takes, pictures included


class ChatSession:
    """A conversation on a model here (provides contracts.Session)."""

    def __init__(self, model: VisionLanguageModel, system: str | None = None, max_context: int | None = None,
                 tools: Sequence[dict] | None = None, context=None, engine=None, encoder: ImageEncoder | None = None):
        """`engine`: run on this prefill/step engine (e.g. one slot of a batched llama.cpp
        context, the server's --parallel) instead of a fresh one of the model's. `encoder`: what
        turns pictures into embeddings (e.g. the server's cache of them) instead of the model's own."""
        self.model = model
        self.system = system
        self._set_tools(tools, context)
        self.engine = engine if engine is not None else model.new_engine(max_context)  # CUDA graphs, or llama.cpp
        self.encoder: ImageEncoder = encoder if encoder is not None else model.encode_images
        self._exchanges: list[Exchange] = []
        self._pending: list[int] = []  # sampled tokens not yet fed to the model (lead the next prompt)
        self._results: list[dict] = []  # tool results given since the last answer, not yet asked
        self._stats = GenerationStats()

    def _set_tools(self, tools, context) -> None:
        specs, docs = tool_specs(tools), documents(context)
        self.model.template.check_tools(specs, docs)
        self.tools, self.documents = specs, docs

    # ---- state -------------------------------------------------------------------------

    @property
    def stats(self) -> GenerationStats:
        """What the last answer cost and why it ended."""
        return self._stats

    @property
    def turns(self) -> list[Exchange]:
        """The conversation so far (a copy: change it through rewind/restore/chat)."""
        return list(self._exchanges)

    @property
    def messages(self) -> list[dict]:
        """The conversation as chat-template messages (without the system prompt)."""
        return template_messages(self._exchanges)

    @property
    def tool_calls(self) -> list[dict]:
        """The tool calls of the last answer (OpenAI's structure; empty without tools)."""
        return list(self._exchanges[-1].tool_calls) if self._exchanges else []

    @property
    def reply(self) -> dict | None:
        """The last answer as an OpenAI assistant message: `content` (None when only calls are
        left) and, when it called tools, `tool_calls`."""
        return reply(self._exchanges[-1], self.model.template.tool_format) if self._exchanges else None

    @property
    def position(self) -> int:
        """Tokens of the conversation in the KV cache."""
        return self.engine.position

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def reset(self, system: str | None | Keep = KEEP, tools=KEEP, context=KEEP) -> None:
        """Start a new conversation (the cache buffers are reused); optionally a new system prompt,
        tools or context."""
        if tools is not KEEP or context is not KEEP:
            self._set_tools(self.tools if tools is KEEP else tools, self.documents if context is KEEP else context)
        if system is not KEEP:
            self.system = system
        self.rewind(0)
        self._results = []

    def rewind(self, turns: int) -> None:
        """Keep only the first `turns` turns: the cache, the messages and the unfed tokens go back
        to how they were before turn `turns` was asked."""
        if turns < 0 or turns > len(self._exchanges):
            raise ValueError(f"cannot rewind to turn {turns}: the conversation has {len(self._exchanges)}")
        if turns == len(self._exchanges):
            return
        cut = self._exchanges[turns] if turns else None
        self.engine.rewind(cut.start if cut else 0)
        self._pending = list(cut.pending_before) if cut else []
        del self._exchanges[turns:]
        self._results = []

    # ---- prompt building -------------------------------------------------------------

    def _head(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def _prompt_chunks(self, new: list[dict], tiles: Sequence[int] = (), pictures=None) -> list[list[int]]:
        """Token-id chunks of the next prompt (the unfed tokens first), to interleave with the
        encoded pictures; `new` are the turn's messages (tool results, the user's question);
        `tiles[i]` is how many tiles picture i takes (tiled models); `pictures` the pictures themselves,
        when known (NVILA-Lite writes a message's only image, video frames aside, as its tiles' lines)."""
        # every text of the messages, tools and documents is quoted: only the template's markup
        # becomes control tokens, never "<|im_end|>" written by a user or a tool (tokenizer.py)
        tok = self.model.tokenizer
        tpl, kw = self.model.template, {"tools": tok.quote(self.tools), "documents": tok.quote(self.documents)}
        if not self._exchanges:
            text = tpl.render(tok.quote(self._head() + new), **kw)
        else:
            text = tpl.continuation(tok.quote(self.messages), tok.quote(new), **kw)
        pieces = text.split(IMAGE_MARK)
        if self.model.tiling is not None and len(pieces) > 1:  # each picture's mark -> its tiles' marks
            alone = self.model.lone_image(len(tiles)) if pictures is None else self.model.lone_image(pictures)
            text = pieces[0] + "".join(self.model.image_text(n, alone) + rest for n, rest in zip(tiles, pieces[1:]))
            pieces = text.split(IMAGE_MARK)
        chunks = [tok.encode_prompt(c) for c in pieces]
        start, end = self.model.image_wrap_ids  # token ids around each image (NVILA-era VILA)
        chunks = [(end if i else []) + c + (start if i < len(chunks) - 1 else []) for i, c in enumerate(chunks)]
        chunks[0] = self._pending + chunks[0]
        return chunks

    def _question(self, text: str | None, pictures, results: Sequence[dict] = ()) -> _Question:
        """The prompt of a question with `pictures` (decoded images, or only their number: then
        tiled models count the most tiles a picture can take), after the tool `results`."""
        n_images = pictures if isinstance(pictures, int) else len(pictures)
        if n_images and not self.model.is_multimodal:
            raise EdgeVLMError("this model is text-only: it cannot take images or video")
        content = user_content(text, n_images, self.model.image_mark_suffix)
        if content is None and not results:
            raise EdgeVLMError("nothing to answer: no question and no tool results")
        tiles = self.model.mark_counts(pictures)
        user = [] if content is None else [{"role": "user", "content": content}]
        chunks = self._prompt_chunks(list(results) + user, tiles, None if isinstance(pictures, int) else pictures)
        return _Question(content, chunks, sum(len(c) for c in chunks) + self.model.image_tokens(pictures))

    def tokens_needed(self, text: str, n_images: int = 0, images=None) -> int:
        """How many context tokens asking `text` with `n_images` images (or video frames) takes now.
        Tiled models (InternVL, NVLM-D) count each image at its most tiles unless `images` (the
        images themselves) are given."""
        if images is not None:
            return self._question(text, [load_image(im) for im in images], self._results).need
        return self._question(text, n_images, self._results).need

    def _check_fits(self, need: int, n_images: int, saved: bool = False) -> None:
        """ContextOverflowError unless `need` prompt tokens and one answer token fit after the cache;
        `saved`: the prompt is an earlier exchange of a conversation put back (restore, chat)."""
        free = self.max_context - self.position
        if need + 1 <= free:
            return
        per = "tokens per tile" if self.model.tiling is not None else "tokens"
        what = f" ({n_images} images x {self.model.tokens_per_image} {per})" if n_images else ""
        head = "the conversation is longer than the context: an earlier turn of it needs" if saved else "prompt needs"
        raise ContextOverflowError(
            f"{head} {need} tokens{what} but only {free - 1} fit in the context "
            f"({self.max_context} tokens, {self.position} used by earlier turns): "
            f"over by {need + 1 - free}; shorten it, use fewer images/frames, /reset, or raise --max-context")

    def _prompt(self, chunks: list[list[int]], images: Sequence[Image.Image],
                stats: GenerationStats | None = None) -> Prompt:
        """The prompt with its pictures encoded; the encoder's time is added to `stats.vision_s`."""
        tiles = self.model.message_tiles(images)  # tiled models: every tile
        if not tiles:
            return Prompt(chunks, None)
        t0 = time.perf_counter()
        embeddings = self.encoder(tiles)
        if stats is not None:
            stats.vision_s += time.perf_counter() - t0
        return Prompt(chunks, embeddings)

    def _new_stats(self, cached: int) -> GenerationStats:
        """The stats of an answer about to be prepared, `cached` of its prompt tokens in the cache."""
        return GenerationStats(cached_prompt_tokens=cached, backend=self.engine.name,
                               vision_backend=self.model.info.vision_backend if self.model.is_multimodal else "")

    def _pictures(self, images, video, frames: int) -> list[Image.Image]:
        pictures = [load_image(im) for im in images]  # each image is decoded here, once
        if video is not None:
            pictures += self.model.video_pictures(sample_frames(video, frames or self.model.video_frames))
        return pictures

    # ---- asking ------------------------------------------------------------------------

    def ask(self, text: str, images=(), gen: GenerationConfig | None = None,
            stop_event: threading.Event | None = None, video=None, frames: int | None = None) -> Iterator[str]:
        """Stream the answer to `text` about `images` (paths, PIL images or arrays) and/or a video, of which
        `frames` are sampled (None: the model's own count, e.g. NVILA's num_video_frames; else 8). Tool
        results given with `tool_result` go first."""
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

    def _ask(self, text: str | None, pictures: Sequence[Image.Image], gen: GenerationConfig | None,
             stop_event: threading.Event | None, t0: float, results: Sequence[dict] = (),
             stats: GenerationStats | None = None) -> Iterator[str]:
        """Generate the answer to one question. `stats`: this answer's so far (chat: the earlier
        exchanges it ran; default: new ones, every token before the question cached)."""
        gen = gen or GenerationConfig()
        results = tuple(results)
        start = self.position
        stats = stats if stats is not None else self._new_stats(start)
        cached = stats.cached_prompt_tokens
        q = self._question(text, pictures, results)
        self._check_fits(q.need, len(pictures))
        prompt = self._prompt(q.chunks, pictures, stats)
        exchange = Exchange(q.content, tuple(pictures), "", start, tuple(self._pending), results)
        self._pending = []
        self._results = []
        self._stats = stats
        answer = AnswerText(self.model.tokenizer, self.model.eos_token_ids,
                            list(gen.stop) + self.model.template.stop_strings)
        prompt_end = start + len(prompt)
        self._exchanges.append(exchange)
        try:
            yield from generate(self.engine, prompt, gen, answer, stop_event, stats, t0)
        finally:
            if self.position < prompt_end:  # the prompt never reached the cache (prefill failed): no turn
                self._exchanges.pop()
                self.engine.rewind(start)
                self._pending = list(exchange.pending_before)
                self._results = list(results)
            else:  # the answer so far stays in the conversation, also when the consumer stops early
                self._pending = answer.tokens[self.position - prompt_end:]  # sampled, never fed: leads the next prompt
                stats.prompt_tokens = prompt_end - cached  # with the earlier exchanges this call ran (chat)
                calls = parse_tool_calls(answer.text, self.model.template.tool_format)[1] if self.tools else []
                self._exchanges[-1] = replace(exchange, answer=answer.text, tool_calls=tuple(calls))

    def answer(self, text: str, **kw) -> str:
        """The whole answer as one string (non-streaming convenience)."""
        return "".join(self.ask(text, **kw))

    def regenerate(self, gen: GenerationConfig | None = None,
                   stop_event: threading.Event | None = None) -> Iterator[str]:
        """Forget the last answer and answer its question (with its images) again."""
        if not self._exchanges:
            raise EdgeVLMError("nothing to regenerate: no question has been asked yet")
        last = self._exchanges[-1]
        self.rewind(len(self._exchanges) - 1)
        return self._ask(last.question, last.images, gen, stop_event, time.perf_counter(), results=last.tool_results)

    def restore(self, exchanges: Sequence[tuple[str, Sequence, str]], system: str | None | Keep = KEEP) -> None:
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

    def _prefill_exchange(self, question: str | None, pictures: Sequence[Image.Image], answer: str,
                          results: Sequence[dict] = (), calls: Sequence[dict] = (),
                          stats: GenerationStats | None = None) -> None:
        """Prefill one saved exchange; an answer that called tools (`calls`, with `answer` the text
        beside them) goes in as the template writes such a message. `stats`: of the answer this
        prefill prepares (chat), its vision time added there."""
        q = self._question(question, pictures, results)
        self._check_fits(q.need, len(pictures), saved=True)
        user = [] if q.content is None else [{"role": "user", "content": q.content}]
        calls = [dict(c) for c in calls]
        text = self._answer_text(list(results) + user, answer, calls) if calls else answer
        exchange = Exchange(q.content, tuple(pictures), text, self.position, tuple(self._pending), tuple(results),
                            tuple(calls))
        self.engine.prefill(self._prompt(q.chunks, pictures, stats))
        tok = self.model.tokenizer  # the client's text as plain text; with calls, the template's markup around it
        self._pending = tok.encode_prompt(self._answer_text(tok.quote(list(results) + user), tok.quote(answer),
                                                            tok.quote(calls))) if calls else tok.encode_text(answer)
        self._exchanges.append(exchange)

    def _answer_text(self, new: list[dict], content: str | None, calls: Sequence[dict]) -> str:
        """The text the template writes for an assistant message with tool calls after `new`
        (what the model would have generated): the whole render with that message, less the
        prompt before it and the end-of-turn text after it."""
        tpl, kw = self.model.template, {"tools": self.tools, "documents": self.documents}
        before = self._head() + self.messages + new
        msg = {"role": "assistant", "content": content or None, "tool_calls": [template_call(c) for c in calls]}
        full = tpl.render(before + [msg], add_generation_prompt=False, **kw)
        prompt = tpl.render(before, add_generation_prompt=True, **kw)
        marked = tpl.render(before + [{"role": "assistant", "content": ANSWER_SENTINEL}], add_generation_prompt=False, **kw)
        end = marked[marked.rfind(ANSWER_SENTINEL) + len(ANSWER_SENTINEL):]
        if not (full.startswith(prompt) and full.endswith(end)) or len(full) < len(prompt) + len(end):
            raise EdgeVLMError(f"chat template {tpl.name!r} does not write tool calls after its assistant prompt")
        return full[len(prompt):len(full) - len(end)].strip()

    def chat(self, messages: Sequence[Message], gen: GenerationConfig | None = None,
             stop_event: threading.Event | None = None, tools=KEEP, context=KEEP) -> Iterator[str]:
        """Answer the last (user or tool) message of a whole conversation, reusing the cache.

        When `messages` extend the conversation already in the cache (same system prompt, tools
        and context, same earlier questions, images, tool results and answers), only the new part
        is run; otherwise the session keeps the longest shared prefix of turns and runs the rest.
        `stats.cached_prompt_tokens` says how many prompt tokens came from the cache, and
        `stats.prompt_tokens` how many were run (the earlier turns run again included). Assistant
        messages may carry `tool_calls` and `role: "tool"` messages their results (OpenAI's
        shapes); `tools` / `context` replace the session's (the default keeps them).
        """
        t0 = time.perf_counter()
        history = split_conversation(messages)
        fmt = self.model.template.tool_format
        if history.uses_tools and fmt is None:
            self.model.template.check_tools([{}], [])  # says why this template has no tool format
        new_tools = self.tools if tools is KEEP else tool_specs(tools)
        new_docs = self.documents if context is KEEP else documents(context)
        if history.system != self.system or new_tools != self.tools or new_docs != self.documents:
            self.reset(history.system, new_tools, new_docs)
        keep = shared_turns(self._exchanges, history.answered, self.model.image_mark_suffix, fmt)
        self.rewind(keep)
        stats = self._new_stats(self.position)
        try:
            for sent in history.answered[keep:]:
                self._prefill_exchange(sent.question, sent.pictures, sent.answer, sent.tool_results, sent.tool_calls,
                                       stats)
        except BaseException:
            self.rewind(keep)
            raise
        last = history.question
        return self._ask(last.question, last.pictures, gen, stop_event, t0, last.tool_results, stats)
