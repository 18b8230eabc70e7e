"""A multi-turn chat with one model: the glue of the data flow.

media -> preprocessing -> vision tower -> projector -> merged embeddings -> LLM -> sampler -> text stream.
The KV cache keeps every earlier turn, so a new question only runs its own tokens. The session
is the only owner of that state: apps rewind, regenerate, restore and continue conversations
through the methods below, never by touching the cache or the message list.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from PIL import Image

from .chat_template import IMAGE_MARK
from .errors import ContextOverflowError, EdgeVLMError
from .generate import AnswerText, GenerationConfig, GenerationStats, Prompt, generate
from .preprocess import load_image
from .video import sample_frames
from .vlm import VisionLanguageModel

_KEEP = object()  # reset(): keep the current system prompt


@dataclass
class Turn:
    """One question and its answer, with where the turn starts in the KV cache."""

    question: str  # the user message as the template sees it (images as <image> marks)
    images: list[Image.Image]  # decoded once, kept for regenerate()
    answer: str
    start: int  # cache position before the question's tokens
    pending_before: list[int]  # sampled-but-unfed tokens of the turn before (they lead this prompt)
    _image_keys: tuple[str, ...] | None = field(default=None, repr=False)

    @property
    def image_keys(self) -> tuple[str, ...]:
        if self._image_keys is None:
            self._image_keys = tuple(image_key(im) for im in self.images)
        return self._image_keys


@dataclass
class Message:
    """A message of a whole conversation handed to `ChatSession.chat` (the server's request shape)."""

    role: str  # system | user | assistant
    content: str  # text; images of a user message go where <image> marks stand, or before the text
    images: Sequence = ()  # paths, PIL images or RGB arrays (user messages only)


def image_key(image: Image.Image) -> str:
    """Content hash of a decoded image: equal pixels, equal key (matches resent images)."""
    h = hashlib.sha256(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class ChatSession:
    def __init__(self, model: VisionLanguageModel, system: str | None = None, max_context: int | None = None):
        self.model = model
        self.system = system
        self.engine = model.new_engine(max_context)  # CUDA graphs on GPU, or llama.cpp
        self._turns: list[Turn] = []
        self._pending: list[int] = []  # sampled tokens not yet fed to the model (lead the next prompt)
        self.stats = GenerationStats()

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
            out += [{"role": "user", "content": t.question}, {"role": "assistant", "content": t.answer}]
        return out

    @property
    def position(self) -> int:
        """Tokens of the conversation in the KV cache."""
        return self.engine.position

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def reset(self, system=_KEEP) -> None:
        """Start a new conversation (the cache buffers are reused); optionally a new system prompt."""
        if system is not _KEEP:
            self.system = system
        self.rewind(0)

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

    # ---- prompt building -------------------------------------------------------------

    def _user_content(self, text: str, n_images: int) -> str:
        marks = text.count(IMAGE_MARK)
        if marks and marks != n_images:
            raise EdgeVLMError(f"the question has {marks} {IMAGE_MARK} marks but {n_images} images were given")
        return text if marks else (IMAGE_MARK + "\n") * n_images + text

    def _prompt_chunks(self, content: str, tiles: Sequence[int] = ()) -> list[list[int]]:
        """Token-id chunks of the next prompt (the unfed tokens first), to interleave with the
        encoded pictures; `tiles[i]` is how many tiles picture i takes (tiled models)."""
        user = {"role": "user", "content": content}
        if not self._turns:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + [user]
            text = self.model.template.render(msgs)
        else:
            text = self.model.template.continuation(self.messages, user)
        pieces = text.split(IMAGE_MARK)
        if self.model.tiling is not None and len(pieces) > 1:  # each picture's mark -> its tiles' marks
            text = pieces[0] + "".join(self.model.image_text(n) + rest for n, rest in zip(tiles, pieces[1:]))
            pieces = text.split(IMAGE_MARK)
        chunks = [self.model.tokenizer.encode(c) for c in pieces]
        chunks[0] = self._pending + chunks[0]
        return chunks

    def _question(self, text: str, pictures) -> tuple[str, list[list[int]], int]:
        """(user content, prompt chunks, tokens needed) for a question with `pictures` (decoded
        images, or only their number: then tiled models count the most tiles a picture can take)."""
        n_images = pictures if isinstance(pictures, int) else len(pictures)
        if n_images and not self.model.is_multimodal:
            raise EdgeVLMError("this model is text-only: it cannot take images or video")
        content = self._user_content(text, n_images)
        tiles = [self.model.tile_count(None if isinstance(pictures, int) else p)
                 for p in (range(n_images) if isinstance(pictures, int) else pictures)]
        chunks = self._prompt_chunks(content, tiles)
        return content, chunks, sum(len(c) for c in chunks) + sum(tiles) * self.model.tokens_per_image

    def tokens_needed(self, text: str, n_images: int = 0, images=None) -> int:
        """How many context tokens asking `text` with `n_images` images (or video frames) takes now.
        Tiled models (InternVL, NVLM-D) count each image at its most tiles unless `images` (the
        images themselves) are given."""
        if images is not None:
            return self._question(text, [load_image(im) for im in images])[2]
        return self._question(text, n_images)[2]

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
        tiles = [t for im in images for t in self.model.image_tiles(im)]  # tiled models: every tile
        return Prompt(chunks, self.model.encode_images(tiles) if tiles else None)

    def _pictures(self, images, video, frames: int) -> list[Image.Image]:
        pictures = [load_image(im) for im in images]  # each image is decoded here, once
        if video is not None:
            pictures += [self.model.mark_video_frame(f) for f in sample_frames(video, frames)]
        return pictures

    # ---- asking ------------------------------------------------------------------------

    def ask(self, text: str, images=(), video=None, frames: int = 8, gen: GenerationConfig | None = None,
            stop_event: threading.Event | None = None) -> Iterator[str]:
        """Stream the answer to `text` about `images` (paths, PIL images or arrays) and/or a video."""
        t0 = time.perf_counter()
        return self._ask(text, self._pictures(images, video, frames), gen, stop_event, t0)

    def _ask(self, text: str, pictures: list[Image.Image], gen: GenerationConfig | None,
             stop_event: threading.Event | None, t0: float, cached: int | None = None) -> Iterator[str]:
        gen = gen or GenerationConfig()
        content, chunks, need = self._question(text, pictures)
        self._check_fits(need, len(pictures))
        prompt = self._prompt(chunks, pictures)
        turn = Turn(content, pictures, "", self.position, self._pending)
        self._pending = []
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
            else:  # the answer so far stays in the conversation, also when the consumer stops early
                self._pending = answer.tokens[self.position - prompt_end:]  # sampled, never fed: leads the next prompt
                turn.answer = answer.text

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
        return self._ask(last.question, last.images, gen, stop_event, time.perf_counter())

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

    def _prefill_exchange(self, question: str, pictures: list[Image.Image], answer: str) -> None:
        content, chunks, need = self._question(question, pictures)
        if need + 1 > self.max_context - self.position:
            raise ContextOverflowError(f"the conversation is longer than the context ({self.max_context} tokens)")
        turn = Turn(content, pictures, answer, self.position, self._pending)
        self.engine.prefill(self._prompt(chunks, pictures))
        self._pending = self.model.tokenizer.encode(answer)
        self._turns.append(turn)

    def chat(self, messages: Sequence[Message], gen: GenerationConfig | None = None,
             stop_event: threading.Event | None = None) -> Iterator[str]:
        """Answer the last (user) message of a whole conversation, reusing the cache.

        When `messages` extend the conversation already in the cache (same system prompt, same
        earlier questions, images and answers), only the new part is run; otherwise the session
        keeps the longest shared prefix of turns and runs the rest. `stats.cached_prompt_tokens`
        says how many prompt tokens came from the cache.
        """
        t0 = time.perf_counter()
        system, exchanges, (question, pictures) = _split_conversation(messages)
        if system != self.system:
            self.reset(system)
        keep = 0
        for turn, (q, pics, a) in zip(self._turns, exchanges):
            if turn.question != self._user_content(q, len(pics)) or turn.answer != a \
                    or turn.image_keys != tuple(image_key(p) for p in pics):
                break
            keep += 1
        self.rewind(keep)
        cached = self.position
        try:
            for q, pics, a in exchanges[keep:]:
                self._prefill_exchange(q, pics, a)
        except BaseException:
            self.rewind(keep)
            raise
        return self._ask(question, pictures, gen, stop_event, t0, cached)


def _split_conversation(messages: Sequence[Message]):
    """(system, [(question, pictures, answer), ...], (last question, its pictures))."""
    msgs = list(messages)
    system = None
    if msgs and msgs[0].role == "system":
        system, msgs = msgs[0].content, msgs[1:]
    if not msgs or msgs[-1].role != "user":
        raise EdgeVLMError("the conversation must end with a user message")
    exchanges = []
    for i in range(0, len(msgs) - 1, 2):
        user, reply = msgs[i], msgs[i + 1]
        if user.role != "user" or reply.role != "assistant":
            raise EdgeVLMError("messages after the system prompt must alternate user, assistant, ..., user "
                               f"(message {i + 1 + (system is not None)} is {user.role!r}, then {reply.role!r})")
        if reply.images:
            raise EdgeVLMError("only user messages can carry images")
        exchanges.append((user.content, [load_image(im) for im in user.images], reply.content))
    last = msgs[-1]
    return system, exchanges, (last.content, [load_image(im) for im in last.images])
