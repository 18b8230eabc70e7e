"""Tokenizer: `tokenizers` (tokenizer.json) with a sentencepiece fallback (tokenizer.model),
plus an incremental decoder for streaming text that never splits a multi-byte character.

Control tokens (`<|im_end|>`, `</s>`, `<extra_id_1>`, ...) may come only from a chat template's
own markup, never from what a user, a tool or a document wrote: text that spells one would
otherwise close its own turn and open a system or assistant turn. So text is encoded two ways:
`encode` reads control-token text as the control token (for the template's markup), and
`encode_text` never does. A prompt is rendered from messages whose text went through `quote`
(every control token's text in it replaced by a placeholder the template passes on as it is);
`encode_prompt` then encodes the markup with control tokens and each placeholder as plain text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import sentencepiece as spm
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from ..errors import CheckpointError
from .templates import IMAGE_MARK


# A quoted control token in rendered text: U+E002, its index in `Tokenizer.quoted_texts`, U+E003.
# Private-use characters: templates pass them on untouched, and user text cannot forge one (its
# own U+E002 is itself quoted). U+E000 starts the chat template's answer sentinel: quoted too.
_QUOTE_OPEN, _QUOTE_CLOSE = "\uE002", "\uE003"
_QUOTED = re.compile(_QUOTE_OPEN + r"(\d+)" + _QUOTE_CLOSE)
_MARKUP = re.compile(r"<[^<>\s]+>|\[[^\[\]\s]+\]")


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
            added = self._hf.get_added_tokens_decoder()
            self.special_ids = {i for i, t in added.items() if t.special}
            # control tokens: the special ones, and added tokens shaped like markup (`<tool_call>`, `[INST]`)
            markup = [t.content for t in added.values() if not t.special and _MARKUP.fullmatch(t.content)]
            specials = [t.content for t in added.values() if t.special] + markup
            self._plain_hf = HFTokenizer.from_str(self._hf.to_str())  # a copy that reads control-token text as text
            self._plain_hf.add_special_tokens([AddedToken(t, special=True) for t in markup])
            self._plain_hf.encode_special_tokens = True
        elif (folder / "tokenizer.model").is_file():

            self._sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
            specials = [t for t in (self.bos_token, self.eos_token) if t]
            for entry in (self.config.get("added_tokens_decoder") or {}).values():
                specials.append(entry["content"])
            self._specials = {s: self._sp.piece_to_id(s) for s in specials if self._sp.piece_to_id(s) != self._sp.unk_id()}
            self.special_ids = set(self._specials.values()) | {self._sp.bos_id(), self._sp.eos_id()}
            self.bos_token = self.bos_token or self._sp.id_to_piece(self._sp.bos_id())
            self.eos_token = self.eos_token or self._sp.id_to_piece(self._sp.eos_id())
            specials = list(self._specials)
        else:
            raise CheckpointError(f"no tokenizer in {folder}: expected tokenizer.json or tokenizer.model")
        # what `quote` replaces: every control token's text, longest first, and the two private-use
        # characters that start a placeholder or the template's answer sentinel
        # (the image mark stays: the session places it and splits the prompt there before encoding)
        texts = {s for s in specials if s and s != IMAGE_MARK}
        self.quoted_texts: tuple[str, ...] = tuple(sorted(texts, key=len, reverse=True)) + (_QUOTE_OPEN, "\uE000")
        self._quote_re = re.compile("|".join(re.escape(s) for s in self.quoted_texts))
        self._quote_index = {t: i for i, t in enumerate(self.quoted_texts)}

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

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` as plain text: control-token text in it ("<|im_end|>") is spelled
        out in ordinary tokens, never the control token. For what users, tools and documents wrote."""
        if self._hf:
            return self._plain_hf.encode(text, add_special_tokens=False).ids
        ids: list[int] = []  # sentencepiece matches its user-defined symbols in any text: spell those out
        for i in self._sp.encode(text):
            ids += self._spelled(self._sp.id_to_piece(i)) if i in self.special_ids else [i]
        return ids

    def _spelled(self, text: str) -> list[int]:
        """`text` as sentencepiece pieces of one character each (byte pieces where a character has none)."""
        ids = []
        for ch in text:
            i = self._sp.piece_to_id(ch)
            if i == self._sp.unk_id():
                ids += [self._sp.piece_to_id(f"<0x{b:02X}>") for b in ch.encode()]
            else:
                ids.append(i)
        return ids

    def quote(self, value: Any) -> Any:
        """`value` (a string, or lists / dicts of them: messages, tool specs) with every control
        token's text in its strings replaced by a placeholder; render the prompt from the quoted
        messages and encode it with `encode_prompt`. Text without control-token text is unchanged."""
        if isinstance(value, str):
            return self._quote_re.sub(lambda m: f"{_QUOTE_OPEN}{self._quote_index[m.group(0)]}{_QUOTE_CLOSE}", value)
        if isinstance(value, dict):
            return {self.quote(k): self.quote(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.quote(v) for v in value)
        return value

    def unquote(self, text: str) -> str:
        """Rendered text with its placeholders turned back into the text they stand for."""
        return _QUOTED.sub(lambda m: self._quoted(m.group(1)), text)

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt rendered from `quote`d messages: the template's markup with its
        control tokens, each placeholder as the plain text it stands for (`encode_text`)."""
        ids: list[int] = []
        pos = 0
        for m in _QUOTED.finditer(text):
            if m.start() > pos:
                ids += self.encode(text[pos:m.start()])
            ids += self.encode_text(self._quoted(m.group(1)))
            pos = m.end()
        if pos < len(text):
            ids += self.encode(text[pos:])
        return ids

    def _quoted(self, index: str) -> str:
        i = int(index)
        return self.quoted_texts[i] if i < len(self.quoted_texts) else _QUOTE_OPEN + index + _QUOTE_CLOSE

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
