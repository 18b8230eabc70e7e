"""The tokenizer and chat template as GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).

llama.cpp re-implements tokenization from this metadata, so it must describe the tokenizer our
runtime encodes with (edge_vlm/text/tokenizer.py), not a guess:
- a byte-level BPE tokenizer.json (SmolLM2, Qwen2, Llama 3) -> model `gpt2`: tokens as stored,
  the merges, and the pre-tokenizer *name* llama.cpp knows, read from the pre-tokenizer's
  structure (which regex, digits split or not); one we cannot name is an error, because llama.cpp
  would silently split text differently;
- a sentencepiece tokenizer.model (Llama 2 / VILA, Nemotron) -> model `llama`: pieces, scores and
  piece types from sentencepiece itself; llama.cpp applies no normalization, so a model that
  normalizes (sentencepiece's default nmt_nfkc, unlike Llama's identity) is refused.
Rows the model has beyond the tokenizer (padded vocabularies) become unused `[PADn]` tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import sentencepiece as spm
from gguf import TokenType

from edge_vlm.errors import UnsupportedModelError

GPT2_REGEX = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")

# The pre-tokenizer steps of a tokenizer.json (as `_pre_steps` names them) -> llama.cpp's name for them.
PRE_TOKENIZERS = {
    ("bytelevel-regex",): "gpt-2",  # GPT-2's regex, applied by ByteLevel itself
    ("digits", "bytelevel-regex"): "smollm",  # each digit alone, then GPT-2's regex
    (f"split:{QWEN2_REGEX}",): "qwen2",
    (f"split:{LLAMA3_REGEX}",): "llama-bpe",
}


@dataclass
class GGUFVocab:
    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    add_space_prefix: bool = False
    special: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad / eot -> id
    add_bos: bool = False
    add_eos: bool = False

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        writer.add_add_space_prefix(self.add_space_prefix)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
                  "pad": writer.add_pad_token_id, "eot": writer.add_eot_token_id}
        for name, token_id in self.special.items():
            adders[name](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)


def _pre_steps(spec: dict) -> tuple[str, ...]:
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    out = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise UnsupportedModelError("cannot export a byte-level tokenizer that adds a prefix space to GGUF")
            if step.get("use_regex", True):
                out.append("bytelevel-regex")
        elif kind == "Digits" and step.get("individual_digits"):
            out.append("digits")
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            out.append("split:" + str((step.get("pattern") or {}).get("Regex")))
        else:
            out.append(json.dumps(step, sort_keys=True))
    return tuple(out)


def _is_byte_level(spec: dict) -> bool:
    return "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) and spec["model"].get("type") == "BPE"


def _padded(vocab: dict[str, int], size: int, where: str) -> tuple[list[str], list[int]]:
    top = max(vocab.values(), default=-1)
    if top >= size:
        raise UnsupportedModelError(f"the tokenizer has token id {top} but the model only {size} embedding rows ({where})")
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(TokenType.UNUSED)] * size
    for text, i in vocab.items():
        tokens[i], types[i] = text, int(TokenType.NORMAL)
    return tokens, types


def _byte_level_vocab(tok, spec: dict, size: int) -> GGUFVocab:
    steps = _pre_steps(spec)
    pre = PRE_TOKENIZERS.get(steps)
    if pre is None:
        raise UnsupportedModelError(f"cannot name this tokenizer's pre-tokenizer for llama.cpp "
                                    f"({', '.join(s[:60] for s in steps) or 'none'})")
    tokens, types = _padded(tok.hf.get_vocab(with_added_tokens=True), size, "tokenizer.json")
    for i, added in tok.hf.get_added_tokens_decoder().items():
        types[i] = int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return GGUFVocab("gpt2", tokens, types, merges=merges, pre=pre)


def _sentencepiece_vocab(sp, tok, size: int) -> GGUFVocab:
    n = sp.get_piece_size()
    if n > size:
        raise UnsupportedModelError(f"the tokenizer has {n} pieces but the model only {size} embedding rows")
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-1000.0] * size
    types = [int(TokenType.UNUSED)] * size
    for i in range(n):
        tokens[i], scores[i] = sp.id_to_piece(i), float(sp.get_score(i))
        types[i] = int(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                       else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i)
                       else TokenType.NORMAL)
    for key, entry in (tok.config.get("added_tokens_decoder") or {}).items():  # tokens added past the .model
        i = int(key)
        if n <= i < size:
            tokens[i] = entry["content"]
            types[i] = int(TokenType.CONTROL if entry.get("special") else TokenType.USER_DEFINED)
    probe = "a  b"
    if sp.decode(sp.encode(probe)) != probe:  # llama.cpp's SPM tokenizer applies no normalization
        raise UnsupportedModelError("this sentencepiece tokenizer normalizes text (e.g. collapses spaces), "
                                    "which llama.cpp does not: its GGUF would tokenize differently")
    prefix = sp.encode("a", out_type=str)[:1] == ["\u2581a"]  # does it add the dummy "▁" prefix?
    return GGUFVocab("llama", tokens, types, scores=scores, add_space_prefix=prefix)


def _sentencepiece_for(tok):
    if tok.sentencepiece is not None:
        return tok.sentencepiece
    path = tok.folder / "tokenizer.model"
    if path.is_file():

        return spm.SentencePieceProcessor(model_file=str(path))
    return None


def _adds_bos(tok, spec: dict | None, default: bool) -> bool:
    """tokenizer_config's add_bos_token, else whether tokenizer.json's post-processor prepends it."""
    if "add_bos_token" in tok.config:
        return bool(tok.config["add_bos_token"])
    post = (spec or {}).get("post_processor") or {}
    single = post.get("single") if post.get("type") == "TemplateProcessing" else None
    if single:
        first = single[0].get("SpecialToken", {}).get("id")
        return first is not None and first == tok.bos_token
    return default


def gguf_vocab(tok, vocab_size: int, eos_ids: list[int], stop_strings: list[str]) -> GGUFVocab:
    """The GGUF vocabulary of `tok` (an edge_vlm Tokenizer) for a model with `vocab_size` rows."""
    spec = json.loads(tok.hf.to_str()) if tok.hf is not None else None
    if spec is not None and _is_byte_level(spec):
        vocab = _byte_level_vocab(tok, spec, vocab_size)
    else:
        sp = _sentencepiece_for(tok)
        if sp is None:
            kind = (spec or {}).get("model", {}).get("type")
            raise UnsupportedModelError(f"cannot export a {kind} tokenizer.json without a byte-level pre-tokenizer "
                                        f"to GGUF (supported: byte-level BPE, sentencepiece tokenizer.model)")
        vocab = _sentencepiece_vocab(sp, tok, vocab_size)
    ids = {name: tok.token_to_id(text) for name, text in (
        ("bos", tok.bos_token), ("eos", tok.eos_token), ("unk", _text(tok.config.get("unk_token"))),
        ("pad", _text(tok.config.get("pad_token")))) if text}
    if ids.get("eos") is None and eos_ids:
        ids["eos"] = eos_ids[0]
    for stop in stop_strings:  # the chat template's end of turn, when it is one token other than eos
        stop_id = tok.token_to_id(stop)
        if stop_id is not None and stop_id != ids.get("eos"):
            ids["eot"] = stop_id
            break
    vocab.special = {k: int(v) for k, v in ids.items() if v is not None}
    vocab.add_bos = _adds_bos(tok, spec, default=vocab.model == "llama")
    vocab.add_eos = bool(tok.config.get("add_eos_token", False))
    return vocab


def _text(tok) -> str | None:
    if tok is None:
        return None
    return tok.get("content") if isinstance(tok, dict) else tok
