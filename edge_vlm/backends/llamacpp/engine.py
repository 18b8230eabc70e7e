"""The language model on llama.cpp: an `Engine` whose prefill and step run in llama.cpp.

Everything around the LLM stays ours (tokenizer, chat template, sampler, stop strings,
streaming, the vision tower and projector); llama.cpp only turns inputs into logits. Text goes
in as token ids; image embeddings from our projector go in as `llama_batch.embd` rows at their
positions, so a VLM prompt is one sequence of token and embedding batches. The KV cache is
llama.cpp's (one sequence, `max_context` cells).

A rewind keeps the cells past its position (`Cells`): a prompt decoded there next that starts
with the same token ids (a new conversation's system prompt and chat markup, a regenerated
answer's question) keeps those cells and runs only the rest, as llama.cpp's own server does;
whatever does not match is removed before anything is decoded in its place. The cells hold
what a fresh prefill would compute (the same tokens at the same positions); only the batch split
differs, and llama.cpp's CPU kernels were measured bit-exact across splits of prompts under 64
rows on an AVX512 machine (larger batches take other kernels and round differently, as the
cache reuse of earlier turns always has).

Uses llama-cpp-python's low-level bindings (`llama_cpp.llama_cpp`): the high-level `Llama`
class tokenizes, samples and caches prompts by itself, and takes no embeddings.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch

from ...errors import EdgeVLMError
from ...contracts import Prompt
from .extra_buffers import extra_buffers_safe

_init_lock = threading.Lock()
_initialised = False


class _SharedModels:
    """The llama.cpp models this process holds, one per (file, GPU layers, repacked weights), counted by the
    contexts using them: every session and lane of one loaded model decodes over the same weights in memory
    (each with its own KV cache), instead of one copy of the weights per context."""

    def __init__(self):
        self.lock = threading.Lock()
        self.held: dict[tuple, list] = {}  # key -> [model pointer, contexts using it]

    def acquire(self, lib, path: Path, mparams) -> tuple[tuple, object]:
        key = (str(path.resolve()), path.stat().st_mtime_ns, int(mparams.n_gpu_layers), bool(mparams.use_extra_bufts))
        with self.lock:
            entry = self.held.get(key)
            if entry is None:
                model = lib.llama_model_load_from_file(str(path).encode(), mparams)
                if not model:
                    raise EdgeVLMError(f"llama.cpp cannot load {path}: not a GGUF file it reads, or corrupt")
                entry = self.held[key] = [model, 0]
            entry[1] += 1
            return key, entry[0]

    def release(self, lib, key: tuple) -> None:
        with self.lock:
            entry = self.held.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del self.held[key]
                lib.llama_model_free(entry[0])


SHARED_MODELS = _SharedModels()


def llama_cpp_module():
    """llama-cpp-python's bindings, or one clear line on how to get them.

    llama.cpp logs every model load and context creation (hundreds of lines) through the
    `llama-cpp-python` logger; unless someone set its level, only its errors reach stderr.
    """
    try:
        # optional: llama-cpp-python (the llamacpp extra)
        import llama_cpp
    except ImportError as e:
        raise EdgeVLMError("the llama.cpp backend needs llama-cpp-python: pip install 'edge-vlm[llamacpp]' "
                           f"(see the README for CUDA and Jetson builds) ({e})") from None
    log = logging.getLogger("llama-cpp-python")
    if log.level == logging.NOTSET:
        log.setLevel(logging.ERROR)
    return llama_cpp


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class LlamaContext:
    """A GGUF model in llama.cpp with one context of `n_seq` sequences of `seq_cells` KV cells
    each, and its two batches (token ids, embeddings rows): what both engines decode through. Contexts
    over the same file share one copy of its weights (`SHARED_MODELS`)."""

    def __init__(self, gguf_path: str | Path, seq_cells: int, n_seq: int = 1, n_gpu_layers: int = 0,
                 n_threads: int | None = None, batch_size: int = 512, kv_cache_int8: bool = False):
        """`kv_cache_int8`: llama.cpp's Q8_0 K and V cache (`--kv-cache int8`: about half the bytes of
        its F16 cache; quantized V needs flash attention, so that is switched on with it)."""
        global _initialised
        lib = llama_cpp_module()
        self.lib = lib
        with _init_lock:
            if not _initialised:
                lib.llama_backend_init()
                _initialised = True
        path = Path(gguf_path)
        if not path.is_file():
            raise EdgeVLMError(f"GGUF file not found: {path}")
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        if n_gpu_layers == 0:  # AMX / repacked CPU weights crash on some machines: asked once in a child
            mparams.use_extra_bufts = extra_buffers_safe(path)
        self.model_key, self.model = SHARED_MODELS.acquire(lib, path, mparams)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_seq * seq_cells  # split evenly between the sequences
        cparams.n_seq_max = n_seq
        cparams.kv_unified = False
        cparams.n_batch = cparams.n_ubatch = min(batch_size, n_seq * seq_cells)
        cparams.n_threads = cparams.n_threads_batch = n_threads or default_threads()
        if kv_cache_int8:
            cparams.type_k = cparams.type_v = lib.GGML_TYPE_Q8_0
            cparams.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            SHARED_MODELS.release(lib, self.model_key)
            self.model = None
            what = f"a context of {seq_cells} tokens" if n_seq == 1 else f"{n_seq} sequences of {seq_cells} tokens"
            raise EdgeVLMError(f"llama.cpp could not create {what} for {path}")
        self.memory = lib.llama_get_memory(self.ctx)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.n_embd = lib.llama_model_n_embd(self.model)
        self.batch_size = int(cparams.n_batch)
        self.tokens = lib.llama_batch_init(self.batch_size, 0, 1)
        self.embeds = lib.llama_batch_init(self.batch_size, self.n_embd, 1)
        self.path = path

    def decode(self, batch) -> None:
        code = self.lib.llama_decode(self.ctx, batch)
        if code != 0:
            raise EdgeVLMError(f"llama.cpp could not decode the batch (llama_decode returned {code})")

    def logits(self, i: int) -> torch.Tensor:
        """Logits [vocab] (float32) of row `i` of the last decoded batch (-1: its last)."""
        ptr = self.lib.llama_get_logits_ith(self.ctx, i)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())

    def remove(self, seq: int, position: int) -> None:
        """Forget sequence `seq`'s cells from `position` on."""
        self.lib.llama_memory_seq_rm(self.memory, seq, position, -1)

    def close(self) -> None:
        """Free the batches, the context and the model (also done when collected)."""
        lib = getattr(self, "lib", None)
        if lib is None:
            return
        for name in ("tokens", "embeds"):
            if getattr(self, name, None) is not None:
                lib.llama_batch_free(getattr(self, name))
                setattr(self, name, None)
        if getattr(self, "ctx", None):
            lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            SHARED_MODELS.release(lib, self.model_key)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to free into
            pass


class Cells:
    """What each KV cell of one sequence holds: a token id, or None for an embedding row. After a
    rewind the entries past the position stay, for a prompt that starts the same to reuse."""

    def __init__(self):
        self.ids: list[int | None] = []

    def reusable(self, position: int, piece, keep_last: bool) -> int:
        """How many leading token ids of `piece` the cells from `position` on already hold (one
        fewer than all when `keep_last`: the last row is decoded for its logits)."""
        if isinstance(piece, (torch.Tensor, np.ndarray)):  # embedding rows: never reused
            return 0
        n, limit = 0, len(piece) - (1 if keep_last else 0)
        held = self.ids
        while n < limit and position + n < len(held) and held[position + n] == int(piece[n]):
            n += 1
        return n

    def stale_from(self, position: int) -> bool:
        """Forget the entries from `position` on; whether there were any (cells to remove)."""
        if len(self.ids) <= position:
            return False
        del self.ids[position:]
        return True

    def add(self, piece) -> None:
        """Cells decoded next: token ids, or embedding rows (a tensor or an array)."""
        embd = isinstance(piece, (torch.Tensor, np.ndarray))
        self.ids += [None] * piece.shape[0] if embd else [int(t) for t in piece]


class LlamaCppEngine:
    """Prefill/step over a GGUF language model in llama.cpp, for one conversation at a time."""

    name = "llama.cpp"

    def __init__(self, gguf_path: str | Path, max_context: int, n_gpu_layers: int = 0,
                 n_threads: int | None = None, batch_size: int = 512, kv_cache_int8: bool = False):
        """`kv_cache_int8`: a Q8_0 K/V cache (see `LlamaContext`)."""
        self._llama = LlamaContext(gguf_path, max_context, 1, n_gpu_layers, n_threads, batch_size, kv_cache_int8)
        self.n_vocab, self.n_embd = self._llama.n_vocab, self._llama.n_embd
        self._max_context = max_context
        self._position = 0
        self._cells = Cells()
        self.reused_tokens = 0  # prompt tokens the last prefill found in the cache (not run again)
        self.gguf_path = self._llama.path

    # ---- what generate() and the session use ------------------------------------------

    @property
    def position(self) -> int:
        return self._position

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def state_bytes(self) -> int:
        """The size of llama.cpp's saved state: the KV cache's cells in use, plus the last logits."""
        return int(self._llama.lib.llama_state_get_size(self._llama.ctx))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # logits come back to the host, whatever llama.cpp ran on

    def prefill(self, prompt: Prompt | torch.Tensor) -> torch.Tensor:
        """Run a prompt after what is cached; logits [vocab] (float32) for the next token."""
        pieces = [prompt[0]] if isinstance(prompt, torch.Tensor) else list(prompt.pieces())
        if not pieces:
            raise ValueError("an empty prompt")
        self.reused_tokens = 0
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            if self._position + len(piece) > self._max_context:
                raise ValueError(f"positions up to {self._position + len(piece)} exceed the context "
                                 f"{self._max_context}")
            kept = self._cells.reusable(self._position, piece, keep_last=last)
            self._position += kept
            self.reused_tokens += kept
            self._run(piece[kept:], logits=last)
        return self._logits()

    def step(self, token_id: int) -> torch.Tensor:
        self._run([token_id], logits=True)
        return self._logits()

    def rewind(self, position: int) -> None:
        """Go back to `position` (0: the start): what follows is forgotten (its cells are kept
        for a prompt that starts the same, and removed before anything else goes there)."""
        self._position = max(0, min(position, self._position))

    def reset(self) -> None:
        self.rewind(0)

    # ---- batches ------------------------------------------------------------------------

    def _run(self, piece: list[int] | torch.Tensor, logits: bool) -> None:
        """Decode token ids, or [n, hidden] embeddings, in batches; logits only for the very last row."""
        is_embd = isinstance(piece, torch.Tensor)
        if is_embd:
            if piece.dim() != 2 or piece.shape[1] != self.n_embd:
                raise ValueError(f"embeddings must be [n, {self.n_embd}], got {tuple(piece.shape)}")
            rows = np.ascontiguousarray(piece.detach().to(torch.float32).cpu().numpy())
        n = rows.shape[0] if is_embd else len(piece)
        if self._position + n > self._max_context:
            raise ValueError(f"positions up to {self._position + n} exceed the context {self._max_context}")
        if n == 0:  # (a piece the cache held whole)
            return
        llama = self._llama
        if self._cells.stale_from(self._position):  # cells a rewind left that this piece does not reuse
            llama.remove(0, self._position)
        for start in range(0, n, llama.batch_size):
            end = min(start + llama.batch_size, n)
            batch = llama.embeds if is_embd else llama.tokens
            if is_embd:
                ctypes.memmove(batch.embd, rows[start:end].ctypes.data, rows[start:end].nbytes)
            for j in range(end - start):
                if not is_embd:
                    batch.token[j] = int(piece[start + j])
                batch.pos[j] = self._position + j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = 1 if logits and start + j == n - 1 else 0
            batch.n_tokens = end - start
            llama.decode(batch)
            self._cells.add(rows[start:end] if is_embd else piece[start:end])
            self._position += end - start

    def _logits(self) -> torch.Tensor:
        return self._llama.logits(-1)

    def close(self) -> None:
        """Free llama.cpp's context, model and batches (also done when the engine is collected)."""
        self._llama.close()
