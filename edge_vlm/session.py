"""A multi-turn chat with one model: the glue of the data flow.

media -> preprocessing -> vision tower -> projector -> merged embeddings -> LLM -> sampler -> text stream.
The KV cache keeps every earlier turn, so a new question only runs its own tokens.
"""

from __future__ import annotations

import threading
import time
from typing import Iterator

import torch

from .chat_template import IMAGE_MARK
from .errors import ContextOverflowError, EdgeVLMError
from .cuda_engine import make_engine
from .generate import GenerationConfig, GenerationStats, generate
from .preprocess import load_image
from .tokenizer import StreamDecoder
from .video import sample_frames
from .vlm import VisionLanguageModel


class ChatSession:
    def __init__(self, model: VisionLanguageModel, system: str | None = None, max_context: int | None = None):
        self.model = model
        self.system = system
        self.engine = make_engine(model.llm, max_context or model.max_context)  # CUDA graphs on GPU
        self.messages: list[dict] = []  # the conversation as text (images as <image> marks)
        self.pending: list[int] = []  # sampled tokens not yet fed to the model
        self.stats = GenerationStats()

    def reset(self) -> None:
        """Start a new conversation (the cache buffers are reused)."""
        self.messages.clear()
        self.pending.clear()
        self.engine.reset()

    # ---- prompt building -------------------------------------------------------------

    def _user_content(self, text: str, n_images: int) -> str:
        marks = text.count(IMAGE_MARK)
        if marks and marks != n_images:
            raise EdgeVLMError(f"the question has {marks} {IMAGE_MARK} marks but {n_images} images were given")
        return text if marks else (IMAGE_MARK + "\n") * n_images + text

    def _prompt_text(self, user: dict) -> str:
        if not self.messages:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + [user]
            return self.model.template.render(msgs)
        return self.model.template.continuation(self.messages, user)

    def prompt_pieces(self, text: str, n_images: int) -> tuple[list[list[int]], dict]:
        """Token-id chunks to be interleaved with images, and the user message."""
        if n_images and not self.model.is_multimodal:
            raise EdgeVLMError("this model is text-only: it cannot take images or video")
        user = {"role": "user", "content": self._user_content(text, n_images)}
        chunks = [self.model.tokenizer.encode(c) for c in self._prompt_text(user).split(IMAGE_MARK)]
        chunks[0] = self.pending + chunks[0]
        return chunks, user

    def _check_fits(self, chunks: list[list[int]], n_images: int) -> int:
        need = sum(len(c) for c in chunks) + n_images * self.model.tokens_per_image
        free = self.engine.max_context - self.engine.position
        if need + 1 > free:
            what = f" ({n_images} images x {self.model.tokens_per_image} tokens)" if n_images else ""
            raise ContextOverflowError(
                f"prompt needs {need} tokens{what} but only {free - 1} fit in the context "
                f"({self.engine.max_context} tokens, {self.engine.position} used by earlier turns): "
                f"over by {need + 1 - free}; shorten it, use fewer images/frames, /reset, or raise --max-context")
        return need

    def build_embeddings(self, chunks: list[list[int]], images: list) -> torch.Tensor:
        llm = self.model.llm
        feats = self.model.encode_images(images) if images else None
        parts = []
        for i, ids in enumerate(chunks):
            if ids:
                parts.append(llm.embed(torch.tensor(ids, device=self.model.device)))
            if i < len(chunks) - 1:
                parts.append(feats[i].to(self.model.dtype))
        return torch.cat(parts)[None]

    # ---- asking ------------------------------------------------------------------------

    def ask(self, text: str, images=(), video=None, frames: int = 8, gen: GenerationConfig | None = None,
            stop_event: threading.Event | None = None) -> Iterator[str]:
        """Stream the answer to `text` about `images` (paths, PIL images or arrays) and/or a video."""
        gen = gen or GenerationConfig()
        t0 = time.perf_counter()
        pictures = [load_image(im) for im in images]
        if video is not None:
            pictures += sample_frames(video, frames)
        chunks, user = self.prompt_pieces(text, len(pictures))
        self._check_fits(chunks, len(pictures))
        with torch.inference_mode():
            embeds = self.build_embeddings(chunks, pictures)
        self.pending = []
        self.stats = GenerationStats()
        decoder = StreamDecoder(self.model.tokenizer)
        stops = list(gen.stop) + self.model.template.stop_strings
        hold = max((len(s) for s in stops), default=1) - 1
        answer, sent = "", 0
        generated: list[int] = []
        prompt_end = self.engine.position + embeds.shape[1]
        tokens = generate(self.engine, embeds, gen, self.model.eos_token_ids, stop_event, self.stats, t0)
        try:
            for token in tokens:
                generated.append(token)
                answer += decoder.push(token)
                cut = min((answer.find(s) for s in stops if s in answer), default=-1)
                if cut >= 0:
                    answer = answer[:cut]
                    self.stats.stop_reason = "stop_string"
                    break
                safe = max(sent, len(answer) - hold)
                if safe > sent:
                    yield answer[sent:safe]
                    sent = safe
            else:
                answer += decoder.flush()
        finally:
            tokens.close()
            fed = max(self.engine.position - prompt_end, 0)
            self.pending = generated[fed:]  # sampled but never fed: goes in with the next turn
            self.messages += [user, {"role": "assistant", "content": answer}]
        if len(answer) > sent:
            yield answer[sent:]

    def answer(self, text: str, **kw) -> str:
        """The whole answer as one string (non-streaming convenience)."""
        return "".join(self.ask(text, **kw))
