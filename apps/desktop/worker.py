"""The model lives in one worker thread; the window talks to it only through signals.

Loading and generation take seconds to minutes, so they must never run on the UI thread.
A request is a queued signal into this QObject (moved to a QThread); answer pieces come
back as signals. Stop is a threading.Event the generator checks between tokens, so it is
set directly from the UI thread and takes effect within one token.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from PySide6.QtCore import QObject, Signal, Slot

from edge_vlm import ChatSession, EdgeVLMError, GenerationConfig, load_model


@dataclass
class LoadRequest:
    path: str
    device: str | None = None  # None: cuda when available
    dtype: str | None = None  # "float16" ...; None: the device default
    max_context: int | None = None
    system: str | None = None


@dataclass
class AskRequest:
    text: str
    images: list = field(default_factory=list)  # PIL images / arrays
    gen: GenerationConfig = field(default_factory=GenerationConfig)
    regenerate: bool = False  # forget the last turn first, then ask it again
    live: bool = False
    tag: object = None  # handed back with the answer (e.g. the camera frame number)


def readable_error(e: BaseException) -> str:
    """One line a user can act on, for any failure in loading or generating."""
    text = str(e)
    if isinstance(e, EdgeVLMError):
        return text
    if isinstance(e, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text:
        return ("out of memory: the model and its context do not fit; lower the context length, close other "
                "programs, or use a 4-bit model")
    first = text.splitlines()[0] if text else ""
    return f"unexpected error ({type(e).__name__}): {first}"


class ModelWorker(QObject):
    loaded = Signal(object)  # the VisionLanguageModel (its .info is shown)
    load_failed = Signal(str)
    load_progress = Signal(str, int, int)  # stage ("loading LLM", ...), tensors done, tensors in the stage
    piece = Signal(str)  # a piece of the streaming answer
    answered = Signal(object, object)  # GenerationStats, AskRequest
    failed = Signal(str, object)  # message, AskRequest
    restored = Signal(str)  # a note on what the model remembers of a reopened conversation

    def __init__(self):
        super().__init__()
        self.stop_event = threading.Event()
        self.model = None
        self.session: ChatSession | None = None  # rewinds, regenerates, restores: a conversation held here

    def stop(self) -> None:
        """Thread-safe: end the current answer after the token being computed.

        The sender of a request clears `stop_event` before sending it (see MainWindow._ask)."""
        self.stop_event.set()

    @Slot(object)
    def load(self, req: LoadRequest) -> None:
        import torch

        try:
            self.session = self.model = None  # free the old model before loading the next
            _release_memory()
            model = load_model(req.path, device=req.device or None,
                               dtype=getattr(torch, req.dtype) if req.dtype else None,
                               max_context=req.max_context, progress=self.load_progress.emit)
            session = ChatSession(model, system=req.system or None)
            self.model, self.session = model, session
            self.loaded.emit(model)
        except BaseException as e:  # noqa: BLE001 - every failure becomes a message; the app keeps running
            self.load_failed.emit(readable_error(e))

    @Slot(object)
    def ask(self, req: AskRequest) -> None:
        try:
            if self.session is None:
                raise EdgeVLMError("no model loaded: pick a model folder and press Load")
            s = self.session
            turns = len(s.turns)
            if req.regenerate and turns:
                pieces = s.regenerate(gen=req.gen, stop_event=self.stop_event)
                turns -= 1
            else:
                pieces = s.ask(req.text, images=req.images, gen=req.gen, stop_event=self.stop_event)
            try:
                for text in pieces:
                    self.piece.emit(text)
            finally:
                if req.live:  # each Live question stands alone: its frame must not fill the context
                    s.rewind(turns)
            self.answered.emit(s.stats, req)
        except BaseException as e:  # noqa: BLE001
            self.failed.emit(readable_error(e), req)

    @Slot(object, str)
    def restore(self, exchanges: list, system: str) -> None:
        """Put a reopened conversation, [(question, images, answer), ...], back into the model's
        context so it can be continued (nothing is generated)."""
        s = self.session
        if s is None:
            self.restored.emit("no model is loaded: load one to continue this conversation (it starts fresh)")
            return
        try:
            s.restore(exchanges, system=system or None)
            self.restored.emit(f"the model remembers these {len(exchanges)} exchanges; you can continue")
        except BaseException as e:  # noqa: BLE001
            self.restored.emit(f"{readable_error(e)}; the model starts a new context (earlier turns are shown "
                               f"but not remembered)")

    @Slot(str)
    def new_chat(self, system: str) -> None:
        if self.session is not None:
            self.session.reset(system=system or None)


def _release_memory() -> None:
    """Hand freed GPU memory back. No gc.collect() here: this runs on the worker thread, and a
    collection would also destroy unreachable Qt objects of the GUI thread (a crash); dropping
    the references frees the model's tensors already."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_in_use(device) -> str:
    """VRAM allocated on CUDA; resident memory of the process on CPU."""
    import torch

    if device is not None and getattr(device, "type", str(device)) == "cuda":
        return f"VRAM {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB"
    try:
        with open("/proc/self/statm") as f:
            import os

            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return f"RAM {rss / 2**30:.2f} GiB"


__all__ = ["ModelWorker", "LoadRequest", "AskRequest", "readable_error", "memory_in_use"]
