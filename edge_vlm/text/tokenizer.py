"""Tokenizer: `tokenizers` (tokenizer.json) with a sentencepiece fallback (tokenizer.model),
plus an incremental decoder for streaming text that never splits a multi-byte character."""

from __future__ import annotations

import json
import re
from pathlib import Path

import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer

from ..errors import CheckpointError


def _token_text(tok) -> str | None:
    if tok is None:
        return None
    return tok.get("content") if isinstance(tok, dict) else tok


class Tokenizer:
    def __init__(self, folder: Path):
        folder = Path(folder)
        self.folder = folder
        cfg_path = folder / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.chat_template = self.config.get("chat_template")
        jinja = folder / "chat_template.jinja"
        if self.chat_template is None and jinja.is_file():
            self.chat_template = jinja.read_text()
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default", next(iter(named.values()), None))
        self._sp = None
        self._hf = None
        if (folder / "tokenizer.json").is_file():

            try:
                self._hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # noqa: BLE001 - any parse failure is a bad checkpoint
                raise CheckpointError(f"cannot read {folder / 'tokenizer.json'}: {e}") from None
            self.special_ids = {i for i, t in self._hf.get_added_tokens_decoder().items() if t.special}
        elif (folder / "tokenizer.model").is_file():

            self._sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            specials = [t for t in (self.bos_token, self.eos_token) if t]
            for entry in (self.config.get("added_tokens_decoder") or {}).values():
                specials.append(entry["content"])
            self._specials = {s: self._sp.piece_to_id(s) for s in specials if self._sp.piece_to_id(s) != self._sp.unk_id()}
            self.special_ids = set(self._specials.values()) | {self._sp.bos_id(), self._sp.eos_id()}
            self.bos_token = self.bos_token or self._sp.id_to_piece(self._sp.bos_id())
            self.eos_token = self.eos_token or self._sp.id_to_piece(self._sp.eos_id())
        else:
            raise CheckpointError(f"no tokenizer in {folder}: expected tokenizer.json or tokenizer.model")

    @property
    def hf(self):
        """The `tokenizers.Tokenizer` read from tokenizer.json (None: sentencepiece). Exporters
        (the GGUF writer) read the vocabulary and merges from it, exactly as this class encodes."""
        return self._hf

    @property
    def sentencepiece(self):
        """The `SentencePieceProcessor` of tokenizer.model when that is what encodes (else None)."""
        return self._sp

    def token_to_id(self, token: str) -> int | None:
        if self._hf:
            return self._hf.token_to_id(token)
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token text in it (e.g. "<|im_end|>") maps to its id. No BOS added."""
        if self._hf:
            return self._hf.encode(text, add_special_tokens=False).ids
        if not self._specials:
            return self._sp.encode(text)
        pattern = "(" + "|".join(re.escape(s) for s in sorted(self._specials, key=len, reverse=True)) + ")"
        ids: list[int] = []
        for part in re.split(pattern, text):
            if part in self._specials:
                ids.append(self._specials[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        if self._hf:
            return self._hf.decode(list(ids), skip_special_tokens=skip_special)
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self._sp.decode(list(ids))


class StreamDecoder:
    """Turns a growing list of token ids into text pieces.

    Decoding token by token breaks multi-byte characters (UTF-8 split across byte tokens)
    and leading-space rules; instead we decode a small window and emit only text that is
    complete (does not end in the U+FFFD replacement character).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # ids up to here have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of generation."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""
