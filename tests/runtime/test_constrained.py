"""Constrained decoding on the real SmolLM2-135M: JSON objects, JSON schemas and choices, through
our torch engine and the llama.cpp engine. Every answer is parsed and checked with `jsonschema`;
the mask is also checked against the plain sampler (allow-all mask: the same tokens, seed for seed)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from edge_vlm import ChatSession, GenerationConfig, load_model
from edge_vlm.backends.llamacpp.engine import LlamaCppEngine
from edge_vlm.benchmarks.real_model import gguf_path
from edge_vlm.text.constrained import Constraint, compile_constraint
from edge_vlm.errors import EdgeVLMError
from edge_vlm.generate import AnswerText, GenerationStats, generate
from edge_vlm.contracts import Prompt
from edge_vlm.backends.torch_engine import TorchEngine
from edge_vlm.text.sampling import Sampler, SamplingParams

pytestmark = pytest.mark.slow

EVENT = {"type": "object", "properties": {
    "label": {"type": "string", "enum": ["person", "car", "dog", "cat", "none"]},
    "count": {"type": "integer", "minimum": 0, "maximum": 20},
    "confidence": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01},
    "where": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -999, "maximum": 999},
                                               "y": {"type": "integer", "minimum": -999, "maximum": 999}},
              "required": ["x", "y"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}},
    "required": ["label", "count", "confidence", "where", "tags"], "additionalProperties": False}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}, "city": {"type": "string", "maxLength": 30}},
          "required": ["name", "age"], "additionalProperties": False}
ANSWER = {"type": "object", "properties": {"answer": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 60}},
          "required": ["answer", "reason"], "additionalProperties": False}
SCHEMAS = [EVENT, PERSON, ANSWER]
QUESTIONS = [
    "Describe what a street camera sees at night as JSON.", "A dog runs across a park. Report it.",
    "Two cars are parked outside. Give the detection.", "Nobody is in the room.", "A cat sleeps on a sofa.",
    "Invent a person who lives in Paris.", "Tell me about a 30-year-old teacher.", "Who wrote Hamlet?",
    "Is the sky blue? Answer with a reason.", "Is water dry?", "Can fish fly?", "Summarise: the meeting is at 3pm.",
    "Give me a JSON record.", "What is 2+2?", "List three fruits.", "A person waves at the camera.",
    "Is Paris in France?",
]


@pytest.fixture(scope="module")
def model(smollm2):
    return load_model(smollm2, device="cpu", progress=False)


@pytest.fixture(scope="module")
def fast():
    return LlamaCppEngine(gguf_path(), 512)


def run(model, engine, question, **gen):
    """One answer through `generate` on `engine`: (text, stats, tokens)."""
    engine.reset()
    ids = model.tokenizer.encode(model.template.render([{"role": "user", "content": question}]))
    answer = AnswerText(model.tokenizer, model.eos_token_ids, list(gen.pop("stop", [])) + model.template.stop_strings)
    stats = GenerationStats()
    text = "".join(generate(engine, Prompt([ids]), GenerationConfig(**{"max_new_tokens": 160, **gen}), answer,
                            stats=stats))
    return text, stats, list(answer.tokens)


def test_spec_forms_parse_to_one_constraint():
    assert Constraint.parse({"type": "json_object"}).kind == "json_object"
    openai = Constraint.parse({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    assert openai == Constraint.parse(PERSON) == Constraint.parse(json.dumps(PERSON))  # NIM guided_json, dict or text
    assert Constraint.parse(["yes", "no"]) == Constraint.choice(("yes", "no"))
    for bad in ([], [""], 3, "not json", {"type": "json_schema", "json_schema": {}}, {"type": "text"}):
        with pytest.raises(EdgeVLMError):
            Constraint.parse(bad)


def test_invalid_schema_is_one_clear_line(model):
    for schema, word in [({"type": "object", "properties": {"a": {"type": "nonsense"}}}, "nonsense"),
                         ({"type": "string", "pattern": "(unclosed"}, "regex")]:
        with pytest.raises(EdgeVLMError) as e:
            compile_constraint(schema, model.tokenizer, model.eos_token_ids)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("constraint: invalid json schema") and word in msg.lower(), msg


def test_masks_of_one_grammar_are_independent_and_padding_is_never_allowed(model):
    a = compile_constraint(["yes", "no"], model.tokenizer, model.eos_token_ids)
    b = compile_constraint(["yes", "no"], model.tokenizer, model.eos_token_ids)  # cached grammar, fresh state
    first = a.allowed(a.vocab_size + 64)
    assert first.shape == (a.vocab_size + 64,) and not first[a.vocab_size:].any()
    assert not first[min(model.eos_token_ids)]  # the empty answer is no choice
    for t in model.tokenizer.encode("yes"):
        a.advance(t)
    assert a.complete and a.done and not b.complete and torch.equal(b.allowed(a.vocab_size + 64), first)
    with pytest.raises(EdgeVLMError):
        b.advance(model.tokenizer.encode("maybe")[0])


def test_allow_all_mask_samples_exactly_like_the_plain_sampler(model):
    """The mask path against the plain path: a mask allowing every token changes nothing, per seed."""
    g = torch.Generator().manual_seed(0)
    allow = torch.ones(300, dtype=torch.bool)
    for params in [SamplingParams(0.0), SamplingParams(0.9, 0.9, 0, 1.0, 3), SamplingParams(1.2, 1.0, 20, 1.3, 4),
                   SamplingParams(0.0, 1.0, 0, 1.2, None), SamplingParams(0.7, 0.5, 5, 1.0, 5)]:
        plain, masked = Sampler(params), Sampler(params)
        for _ in range(30):
            logits, hist = torch.randn(300, generator=g) * 4, torch.randint(0, 300, (8,), generator=g)
            assert plain(logits, hist) == masked(logits, hist, allow)
    some = torch.zeros(300, dtype=torch.bool)
    some[[5, 77, 299]] = True
    sampler = Sampler(SamplingParams(1.5, 1.0, 0, 1.0, 9))
    assert {sampler(torch.randn(300, generator=g) * 4, None, some) for _ in range(200)} == {5, 77, 299}


def test_allow_all_grammar_generates_token_for_token_like_unconstrained(model, fast):
    everything = Constraint("lark", lark=f"start: <[0-{model.tokenizer.hf.get_vocab_size() - 1}]>*")
    for seed in (1, 2, 3):
        gen = dict(temperature=0.9, top_p=0.95, seed=seed, max_new_tokens=40)
        plain, masked = run(model, fast, "Tell me a story.", **gen), run(model, fast, "Tell me a story.",
                                                                         constraint=everything, **gen)
        assert masked[2] == plain[2] and masked[0] == plain[0] and masked[1].stop_reason == plain[1].stop_reason


def test_json_schema_answers_always_validate_on_llama_cpp(model, fast):
    """50 prompts (17 questions, each under each of three schemas), greedy and sampled in turn:
    every answer ends by itself (EOS where the grammar may end), parses and validates."""
    cases = [(q, schema) for schema in SCHEMAS for q in QUESTIONS][:50]
    assert len(cases) == len(set((q, id(s)) for q, s in cases)) == 50
    for i, (question, schema) in enumerate(cases):
        gen = dict(temperature=0) if i % 2 else dict(temperature=0.9, top_p=0.95, seed=i)
        text, stats, _ = run(model, fast, question, constraint=schema, **gen)
        assert stats.stop_reason == "eos", (question, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_and_schema_on_the_torch_engine_through_the_session(model):
    session = ChatSession(model)
    for i, gen in enumerate([dict(temperature=0), dict(temperature=0.8, seed=11)]):
        text = session.answer("Describe a dog as a JSON object.",
                              gen=GenerationConfig(max_new_tokens=120, constraint={"type": "json_object"}, **gen))
        # json_object bounds nothing: greedy SmolLM2 lists numbers in an array until the limit. An answer
        # either completes the grammar (eos) and parses, or says it was cut short
        if session.stats.stop_reason == "eos":
            assert isinstance(json.loads(text), dict), text
        else:
            assert session.stats.stop_reason == "max_new_tokens" and session.stats.new_tokens == 120
            assert text.startswith("{")
        spec = {"type": "json_schema", "json_schema": {"name": "event", "schema": SCHEMAS[i]}}
        text = session.answer("And now report it.", gen=GenerationConfig(max_new_tokens=160, constraint=spec, **gen))
        jsonschema.validate(json.loads(text), SCHEMAS[i])


def test_choices_give_exactly_one_choice_on_both_engines(model, fast):
    torch_engine = TorchEngine(model.llm, 512)
    for engine in (fast, torch_engine):
        for q in ("Is the sky blue? Answer yes or no.", "Is fire cold? Answer yes or no.", "Are cats animals?"):
            for gen in (dict(temperature=0), dict(temperature=1.0, seed=5)):
                text, stats, _ = run(model, engine, q, constraint=["yes", "no"], **gen)
                assert text in ("yes", "no") and stats.stop_reason == "eos"
        # a choice that is a prefix of another: the model may stop at either, never in between
        text, stats, _ = run(model, engine, "Do you agree?", constraint=["yes", "yes indeed", "no"], temperature=0)
        assert text in ("yes", "yes indeed", "no") and stats.stop_reason == "eos"


class EagerToEnd:
    """A real engine whose EOS logits are raised far above every other: the model wants to stop now."""

    def __init__(self, engine, eos_ids):
        self.engine, self.eos = engine, sorted(eos_ids)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def _bias(self, logits):
        logits = logits.clone()
        logits[self.eos] += 100.0
        return logits

    def prefill(self, prompt):
        return self._bias(self.engine.prefill(prompt))

    def step(self, token):
        return self._bias(self.engine.step(token))


def test_eos_only_where_the_grammar_can_end(model, fast):
    eager = EagerToEnd(fast, model.eos_token_ids)
    text, stats, _ = run(model, eager, "Hi", temperature=0)
    assert text == "" and stats.stop_reason == "eos"  # unconstrained, the bias ends the answer at once
    for schema in SCHEMAS:
        text, stats, tokens = run(model, eager, "Report.", constraint=schema, temperature=0)
        jsonschema.validate(json.loads(text), schema)
        # replay the answer: EOS was allowed at no point before its last token (never inside a string)
        mask = compile_constraint(schema, model.tokenizer, model.eos_token_ids)
        eos = min(model.eos_token_ids)
        for i, t in enumerate(tokens):
            assert not mask.allowed(mask.vocab_size)[eos], model.tokenizer.decode(tokens[:i])
            mask.advance(t)
        assert mask.complete and mask.done


def test_length_limit_and_stop_strings_still_apply(model, fast):
    full, stats, tokens = run(model, fast, "A dog runs.", constraint=EVENT, temperature=0)
    assert stats.stop_reason == "eos"
    cut, stats, cut_tokens = run(model, fast, "A dog runs.", constraint=EVENT, temperature=0, max_new_tokens=6)
    assert stats.stop_reason == "max_new_tokens" and cut_tokens == tokens[:6] and full.startswith(cut)
    with pytest.raises(json.JSONDecodeError):  # cut short: says so in stop_reason, and does not parse
        json.loads(cut)
    stopped, stats, _ = run(model, fast, "A dog runs.", constraint=EVENT, temperature=0, stop=['"count"'])
    assert stats.stop_reason == "stop_string" and stopped == full[:full.index('"count"')]


WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"type": "string", "enum": ["C", "F"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "lookup", "parameters": PERSON}}]


@pytest.mark.parametrize("fmt", ["nemovision", "hermes"])
def test_tool_call_constraint_writes_calls_that_parse_and_validate(model, fast, fmt):
    """A forced call (the server's tool_choice) is the template's own call text around arguments
    that validate; `several` lets one or more calls a line apart through."""
    from edge_vlm.text.templates import TOOL_CALL_SYNTAX
    from edge_vlm.text.tools import parse_tool_calls

    before, after = TOOL_CALL_SYNTAX[fmt].before, TOOL_CALL_SYNTAX[fmt].after
    for q, gen in [("Weather in Rome?", dict(temperature=0)), ("Who lives in Paris?", dict(temperature=1.0, seed=7))]:
        text, stats, _ = run(model, fast, q, constraint=Constraint.tool_calls(fmt, TOOLS), **gen)
        assert stats.stop_reason == "eos" and text.startswith(before) and text.endswith(after), text
        left, calls = parse_tool_calls(text, fmt)
        assert left == "" and len(calls) == 1, text
        name = calls[0]["function"]["name"]
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), {"weather": WEATHER, "lookup": PERSON}[name])
        # the arguments are written with json.dumps' spacing, as the template renders a call
        assert text == before + json.dumps({"name": name, "arguments": json.loads(calls[0]["function"]["arguments"])}) + after
    one = Constraint.tool_calls(fmt, TOOLS[1:])
    text, _, _ = run(model, fast, "Weather in Oslo?", constraint=one, temperature=0)  # only `lookup` is allowed
    assert [c["function"]["name"] for c in parse_tool_calls(text, fmt)[1]] == ["lookup"]
    many = Constraint.tool_calls(fmt, TOOLS, several=True)
    text, stats, _ = run(model, fast, "Weather in Rome and Oslo?", constraint=many, temperature=0, max_new_tokens=60)
    left, calls = parse_tool_calls(text, fmt)
    assert len(calls) >= 1 and (left == "" or stats.stop_reason == "max_new_tokens"), text
    with pytest.raises(EdgeVLMError, match="unknown tool-call format"):
        Constraint.tool_calls("xml", TOOLS)
    with pytest.raises(EdgeVLMError, match="at least one tool"):
        Constraint.tool_calls(fmt, [])


def test_without_keeps_a_text_out_and_nothing_else(model, fast):
    """Constraint.without (tool_choice "none"): the tag can never be completed, whatever leads to
    it; anything else, the tag's own pieces included, may be written, and EOS is allowed anywhere."""
    tok = model.tokenizer
    ids = tok.encode("Sure: <toolcall")
    mask = compile_constraint(Constraint.without("<toolcall>"), tok, model.eos_token_ids)
    for t in ids:
        assert mask.allowed(mask.vocab_size)[t]
        mask.advance(t)
    allowed = mask.allowed(mask.vocab_size)
    assert not allowed[tok.encode(">")[0]] and allowed[tok.encode("s")[0]] and mask.complete
    assert all(allowed[e] for e in model.eos_token_ids)
    want = tok.encode("<toolcall> <toolcall>")  # a model that wants to write the tag, twice
    free, _, _ = run(model, Pushy(fast, want), "Hi", temperature=0, max_new_tokens=len(want))
    kept, _, _ = run(model, Pushy(fast, want), "Hi", temperature=0, max_new_tokens=len(want),
                     constraint=Constraint.without("<toolcall>"))
    assert free.startswith("<toolcall> <toolcall>") and kept.startswith("<toolcall") and "<toolcall>" not in kept, kept
    assert Constraint.without("a.b").lark.endswith(r"~/(?s:.*a\.b.*)/")
    with pytest.raises(EdgeVLMError, match="must not be empty"):
        Constraint.without("")


class Pushy:
    """An engine whose logits put `script`'s tokens on top, one per step (a model set on writing them)."""

    def __init__(self, engine, script):
        self.engine, self.script = engine, list(script)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def _push(self, logits):
        if self.script:
            logits = logits.clone()
            logits[self.script.pop(0)] = logits.max() + 1e4
        return logits

    def prefill(self, prompt):
        return self._push(self.engine.prefill(prompt))

    def step(self, token):
        return self._push(self.engine.step(token))


def _deep(levels: int) -> dict:
    schema = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize("spec,words", [
    ({"$ref": "#"}, "refers to itself"),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "refers to itself"),
    (_deep(200), "deeper than 64"),
    (_deep(5000), "deeper than 64"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(6000)}}, "more than 10000"),
    ({"type": "object", "properties": {"\ud800": {"type": "string"}}}, "invalid json schema"),
    ([f"choice {i}" for i in range(10000)], "at most 1024 choices"),
    (["x" * 70000], "at most 1024 choices"),
], ids=["self-ref", "ref-cycle", "depth-200", "depth-5000", "size", "surrogate-key", "10000-choices", "long-choice"])
def test_hostile_constraints_are_refused_before_any_decoding(tmp_path, spec, words):
    """Each is an EdgeVLMError (a 400 at the server) raised by parse or compile, never a
    RecursionError, a ValueError from llguidance or an empty answer."""
    from edge_vlm.text.tokenizer import Tokenizer
    from tests.factories import train_tokenizer

    train_tokenizer(tmp_path)
    with pytest.raises(EdgeVLMError, match=words):
        compile_constraint(spec, Tokenizer(tmp_path), {2})
    # a recursive schema that has answers still compiles
    tree = {"type": "object", "properties": {"child": {"$ref": "#"}, "v": {"type": "integer"}}}
    assert not compile_constraint(tree, Tokenizer(tmp_path), {2}).done
