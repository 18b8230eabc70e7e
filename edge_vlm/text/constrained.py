"""Constrained decoding: the answer must match a grammar (any JSON object, a JSON schema, one of
a list of choices), enforced as a mask over the next token's logits in our sampler.

Why here and not in an engine: every engine (torch, llama.cpp) hands the generate loop logits
[vocab], so one mask applied before sampling constrains them all. The grammar engine is
llguidance (MIT, no dependencies, reads tokenizer.json as it is): benchmarks/constrained_overhead.py
measured it against xgrammar and outlines-core on the real SmolLM2 tokenizer (RESULTS.md).

Three steps, each in one place:
- `Constraint.parse` turns what a caller or an API request gives (OpenAI `response_format`,
  NIM's `guided_json` schema, a list of choices) into one spec; an invalid one is an EdgeVLMError.
- `compile_constraint` builds the grammar for a tokenizer once (the tokenizer's byte table once
  per tokenizer, each grammar once per tokenizer) and keeps both cached.
- `TokenMask` (one per answer) gives the allowed tokens before each sample and advances with each
  sampled token; EOS is allowed only where the grammar may end, and `done` says when the grammar
  can take nothing more, which ends the answer without another model step.
JSON is compact (no free whitespace): a small model cannot spend its budget on blank lines.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import EdgeVLMError
from .templates import TOOL_CALL_SYNTAX
from .tools import tool_specs


# Bounds on what a request may ask, checked before any grammar is built: a schema nested deeper
# than llguidance parses (serde's 128 levels of JSON) or big enough to take seconds to compile,
# and choice lists that would make the lexer's automaton huge, are refused with one clear line.
MAX_SCHEMA_DEPTH = 64  # levels of JSON nesting in the schema text
MAX_SCHEMA_NODES = 10_000  # objects, arrays and values in it
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 64 * 1024


def check_schema(schema) -> None:
    """EdgeVLMError unless `schema` is within the depth and size bounds and has no `$ref` that
    resolves to itself without a value in between (`{"$ref": "#"}`, a <-> b: no answer could
    ever match). Walks iteratively: a hostile depth cannot exhaust Python's stack here."""
    nodes, stack = 0, [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if depth > MAX_SCHEMA_DEPTH:
            raise EdgeVLMError(f"constraint: the JSON schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
        if nodes > MAX_SCHEMA_NODES:
            raise EdgeVLMError(f"constraint: the JSON schema has more than {MAX_SCHEMA_NODES} parts")
        if isinstance(value, dict):
            stack += [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]
    for start in _refs(schema):
        seen, ref = set(), start
        while isinstance(ref, str):
            if ref in seen:
                raise EdgeVLMError(f"constraint: the JSON schema's $ref {start!r} refers to itself; no answer "
                                   "could match it")
            seen.add(ref)
            target = _resolve(schema, ref)
            ref = target.get("$ref") if isinstance(target, dict) and set(target) <= {"$ref", "$defs",
                                                                                    "definitions"} else None


def _refs(schema) -> list[str]:
    out, stack = [], [schema]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if isinstance(value.get("$ref"), str):
                out.append(value["$ref"])
            stack += value.values()
        elif isinstance(value, list):
            stack += value
    return out


def _resolve(schema, ref: str):
    """The part of `schema` a local `$ref` ("#", "#/$defs/a") points at (None: not local or missing)."""
    if ref != "#" and not ref.startswith("#/"):
        return None
    node = schema
    for key in [k.replace("~1", "/").replace("~0", "~") for k in ref[2:].split("/")] if ref != "#" else []:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return None
    return node


@dataclass(frozen=True)
class Constraint:
    """What the answer must be. kind: "json_object" (any JSON object), "json_schema" (`schema`),
    "choice" (exactly one of `choices`), "lark" (a grammar in llguidance's Lark syntax), or
    "tool_call" (a call to one of some functions in a model's tool-call syntax: `tool_calls`)."""

    kind: str
    schema: str = ""  # the JSON schema as canonical JSON text (hashable, a cache key)
    choices: tuple[str, ...] = ()  # "tool_call": the functions' names
    lark: str = ""

    @classmethod
    def parse(cls, spec) -> "Constraint":
        """A Constraint from what an API gives: a Constraint; `{"type": "json_object"}`;
        `{"type": "json_schema", "json_schema": {"schema": {...}}}` (OpenAI response_format);
        a JSON schema itself (NIM's `nvext.guided_json`, as a dict or JSON text); a list of strings."""
        if isinstance(spec, Constraint):
            return spec
        if isinstance(spec, (list, tuple)):
            return cls.choice(spec)
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise EdgeVLMError(f"constraint: a JSON schema given as text is not JSON ({e})") from None
        if not isinstance(spec, dict):
            raise EdgeVLMError(f"constraint: expected a JSON schema, a response_format or a list of choices, "
                               f"got {type(spec).__name__}")
        kind = spec.get("type")
        if kind == "json_object" and set(spec) <= {"type"}:
            return cls("json_object")
        if kind == "json_schema" and "json_schema" in spec:
            inner = spec["json_schema"]
            if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict):
                raise EdgeVLMError('constraint: response_format json_schema needs {"json_schema": {"schema": {...}}}')
            return cls.json_schema(inner["schema"])
        if kind == "text" and set(spec) <= {"type"}:
            raise EdgeVLMError('constraint: response_format {"type": "text"} means no constraint; pass None')
        return cls.json_schema(spec)

    @classmethod
    def json_schema(cls, schema: dict) -> "Constraint":
        if not isinstance(schema, dict):
            raise EdgeVLMError(f"constraint: a JSON schema must be an object, got {type(schema).__name__}")
        check_schema(schema)
        try:
            text = json.dumps(schema)  # property order is the order the answer writes them
        except (TypeError, ValueError) as e:
            raise EdgeVLMError(f"constraint: the JSON schema is not JSON-serialisable ({e})") from None
        return cls("json_schema", schema=text)

    @classmethod
    def choice(cls, choices) -> "Constraint":
        choices = tuple(choices)
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise EdgeVLMError("constraint: choices must be a non-empty list of non-empty strings")
        if len(choices) > MAX_CHOICES or sum(map(len, choices)) > MAX_CHOICE_CHARS:
            raise EdgeVLMError(f"constraint: at most {MAX_CHOICES} choices of {MAX_CHOICE_CHARS} characters "
                               f"in all (got {len(choices)} of {sum(map(len, choices))})")
        return cls("choice", choices=choices)

    @classmethod
    def tool_calls(cls, fmt: str, tools, several: bool = False) -> "Constraint":
        """The answer is a call to one of `tools` (OpenAI specs, checked), or with `several` one or
        more calls a line apart, written in tool-call syntax `fmt` exactly as the chat template
        writes them (`templates.TOOL_CALL_SYNTAX`), the arguments valid for the function's
        parameter schema. How the server forces `tool_choice` "required" or a named function."""

        if fmt not in TOOL_CALL_SYNTAX:
            raise EdgeVLMError(f"constraint: unknown tool-call format {fmt!r}; known: {', '.join(TOOL_CALL_SYNTAX)}")
        specs = tool_specs(tools)
        if not specs:
            raise EdgeVLMError("constraint: a tool call needs at least one tool")
        syntax = TOOL_CALL_SYNTAX[fmt]
        before, after, between = syntax.before, syntax.after, syntax.between
        rules, names = [], []
        for i, spec in enumerate(specs):
            fn = spec["function"]
            schema = dict(fn["parameters"])  # json.dumps spacing, as the template's tojson writes arguments
            schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
            head = before + '{"name": ' + json.dumps(fn["name"]) + ', "arguments": '
            rules.append(f"call_{i}: {json.dumps(head)} args_{i} {json.dumps('}' + after)}")
            rules.append(f"args_{i}: %json {json.dumps(schema)}")
            names.append(fn["name"])
        one = " | ".join(f"call_{i}" for i in range(len(specs)))
        start = f"start: call ({json.dumps(between)} call)*" if several else "start: call"
        return cls("tool_call", choices=tuple(names), lark="\n".join([start, f"call: {one}", *rules]))

    @classmethod
    def without(cls, text: str) -> "Constraint":
        """Any answer that never contains `text` (e.g. a tool call's opening tag: the server's
        tool_choice "none" shows the tools yet lets no call begin). One regex lexeme: the model
        writes freely, only a token that would complete `text` is masked."""
        if not text:
            raise EdgeVLMError("constraint: the text to keep out must not be empty")
        literal = "".join("\\" + c if c in "\\.+*?()|[]{}^$#&-~/" else c for c in text)
        return cls("lark", choices=(text,), lark=f"start: TEXT\nTEXT: /(?s:.*)/ & ~/(?s:.*{literal}.*)/")

    def grammar(self) -> str:
        """This constraint as an llguidance grammar (JSON text)."""
        # optional: llguidance (the structured extra)
        from llguidance import LLMatcher

        compact = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=compact)
        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.schema, overrides=compact)
        if self.kind == "choice":
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.choices))
        if self.kind in ("lark", "tool_call"):
            return LLMatcher.grammar_from_lark(self.lark)
        raise EdgeVLMError(f"constraint: unknown kind {self.kind!r}")

    def describe(self) -> str:
        return {"json_object": "a JSON object", "json_schema": "JSON matching the schema",
                "choice": "one of " + ", ".join(map(repr, self.choices)), "lark": "the grammar",
                "tool_call": "a call to " + " or ".join(self.choices)}.get(self.kind, self.kind)


def llguidance_module():
    try:
        # optional: llguidance (the structured extra)
        import llguidance
    except ImportError:
        raise EdgeVLMError("constrained decoding needs llguidance: pip install 'edge-vlm[structured]'") from None
    return llguidance


class _Compiled:
    """One tokenizer's llguidance tables and its compiled grammars (a fresh matcher per grammar,
    copied for each answer: copying is cheap, compiling is not)."""

    MAX_GRAMMARS = 64

    def __init__(self, tokenizer, eos_ids: tuple[int, ...]):
        llg = llguidance_module()
        if tokenizer.hf is None:
            raise EdgeVLMError("constrained decoding needs a tokenizer.json tokenizer (this checkpoint has only "
                               "sentencepiece's tokenizer.model)")
        self.llg = llg
        self.tokenizer = llg.LLTokenizer(tokenizer.hf.to_str(), eos_token=list(eos_ids))
        self.vocab_size = self.tokenizer.vocab_size
        self.grammars: OrderedDict[Constraint, object] = OrderedDict()
        self.lock = threading.Lock()

    def matcher(self, constraint: Constraint):
        with self.lock:
            fresh = self.grammars.get(constraint)
            if fresh is None:
                what = constraint.kind.replace("_", " ")
                try:
                    grammar = constraint.grammar()
                    fresh = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
                except (ValueError, TypeError, RuntimeError) as e:  # llguidance refuses the schema itself
                    raise EdgeVLMError(f"constraint: invalid {what}: {_one_line(str(e))}") from None
                if fresh.is_error():
                    raise EdgeVLMError(f"constraint: invalid {what}: " + _one_line(fresh.get_error()))
                if fresh.is_stopped():  # nothing but the empty answer fits (e.g. a $ref llguidance gives up on)
                    raise EdgeVLMError(f"constraint: no answer can match this {what}")
                self.grammars[constraint] = fresh
                while len(self.grammars) > self.MAX_GRAMMARS:
                    self.grammars.popitem(last=False)
            self.grammars.move_to_end(constraint)
            return fresh.deep_copy()


def _one_line(message: str) -> str:
    return " ".join(message.split("\n<state>")[0].split())


_compiled: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {eos ids: _Compiled}
_compiled_lock = threading.Lock()


def compile_constraint(constraint, tokenizer, eos_ids) -> "TokenMask":
    """A TokenMask for one answer under `constraint` (anything `Constraint.parse` takes), for
    `tokenizer` (our Tokenizer) ending at `eos_ids`. Compiles once per tokenizer and grammar."""
    constraint = Constraint.parse(constraint)
    key = tuple(sorted(eos_ids))
    with _compiled_lock:
        per_tokenizer = _compiled.setdefault(tokenizer, {})
        if key not in per_tokenizer:
            per_tokenizer[key] = _Compiled(tokenizer, key)
        compiled = per_tokenizer[key]
    return TokenMask(compiled.matcher(constraint), compiled.vocab_size, constraint)


class TokenMask:
    """The grammar's state for one answer: which tokens may come next, and advancing past one."""

    def __init__(self, matcher, vocab_size: int, constraint: Constraint):
        self.constraint = constraint
        self._m = matcher
        self.vocab_size = vocab_size
        self._bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)

    def allowed(self, n_logits: int) -> torch.Tensor:
        """bool [n_logits]: True where the next token may be sampled (rows past the tokenizer's
        vocabulary, padding of the embedding table, are never allowed)."""
        self._m.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        # bit k of word i is token 32 i + k: numpy's unpackbits over the words' little-endian bytes, one
        # tight single-threaded loop (~20 µs; torch's shift-and-mask spreads over its thread pool and took
        # 70 ms a token on a 2-core machine with other jobs running)
        words = self._bits.numpy().astype("<i4", copy=False).view(np.uint8)
        bits = torch.from_numpy(np.unpackbits(words, bitorder="little").view(np.bool_))
        if n_logits <= bits.numel():
            return bits[:n_logits]
        return torch.cat([bits, torch.zeros(n_logits - bits.numel(), dtype=torch.bool)])

    def advance(self, token: int) -> None:
        """Move past a sampled token (one the mask allowed)."""
        if not self._m.consume_token(token):
            raise EdgeVLMError(f"constraint: token {token} does not fit {self.constraint.describe()}: "
                               + _one_line(self._m.get_error()))

    @property
    def complete(self) -> bool:
        """The answer so far is a whole match (EOS is allowed now)."""
        return self._m.is_accepting()

    @property
    def done(self) -> bool:
        """Complete, and the grammar takes no further token: the answer ends here."""
        return self._m.is_stopped()
