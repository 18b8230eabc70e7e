"""Sampling, stopping, streaming and statistics of generation."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_vlm import ChatSession, GenerationConfig, load_model
from edge_vlm.errors import EdgeVLMError
from edge_vlm.text.sampling import GenerationConfigError, Sampler, SamplingParams
from edge_vlm.text.tokenizer import StreamDecoder, Tokenizer


def ask(model, text="Describe the picture.", **gen):
    session = ChatSession(model)
    return session.answer(text, gen=GenerationConfig(**{"max_new_tokens": 16, **gen})), session


def test_same_seed_same_text_and_seeds_differ(model):
    a, _ = ask(model, temperature=1.0, top_p=1.0, seed=7)
    b, _ = ask(model, temperature=1.0, top_p=1.0, seed=7)
    others = {ask(model, temperature=1.0, top_p=1.0, seed=s)[0] for s in range(8, 12)}
    assert a == b
    assert len(others | {a}) > 1


def test_degenerate_sampling_equals_greedy(model):
    greedy, _ = ask(model, temperature=0)
    assert ask(model, temperature=0.8, top_k=1, seed=1)[0] == greedy
    assert ask(model, temperature=0.8, top_p=1e-6, seed=2)[0] == greedy


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(50, generator=g) * 3
        hist = torch.randint(0, 50, (6,), generator=g)
        for p, k, rep in [(0.9, 0, 1.0), (0.5, 0, 1.3), (1.0, 5, 1.0), (0.7, 10, 1.2)]:
            ref = RepetitionPenaltyLogitsProcessor(rep)(hist[None], logits[None].clone()) if rep != 1 else logits[None]
            ref = ref / 0.7
            if k:
                ref = TopKLogitsWarper(k)(None, ref)
            if p < 1:
                ref = TopPLogitsWarper(p)(None, ref)
            kept_ref = torch.isfinite(ref[0])
            # our sampler only ever draws from its kept set: collect it by sampling many times
            sampler = Sampler(SamplingParams(temperature=0.7, top_p=p, top_k=k, repetition_penalty=rep, seed=1))
            drawn = {sampler(logits, hist) for _ in range(400)}
            assert drawn <= set(torch.nonzero(kept_ref).flatten().tolist())
            probs = ref[0].softmax(-1)
            likely = set(torch.nonzero(probs > 0.05).flatten().tolist())
            assert likely <= drawn  # every token with >5% mass shows up in 400 draws


def test_eos_stops_and_is_not_shown(model):
    greedy, session = ask(model, temperature=0, max_new_tokens=10)
    ids = model.tokenizer.encode(greedy)
    model_eos = model.llm.cfg.eos_token_ids
    try:
        model.llm.cfg.eos_token_ids = [ids[3]]
        cut, s2 = ask(model, temperature=0, max_new_tokens=10)
    finally:
        model.llm.cfg.eos_token_ids = model_eos
    assert s2.stats.stop_reason == "eos"
    assert greedy.startswith(cut) and len(cut) < len(greedy)


def test_stop_string_truncates(model):
    greedy, _ = ask(model, temperature=0, max_new_tokens=16)
    stop = greedy[5:8]
    cut, session = ask(model, temperature=0, max_new_tokens=16, stop=[stop])
    assert cut == greedy[:greedy.find(stop)]
    assert session.stats.stop_reason == "stop_string"


def test_stop_event_ends_generation_at_once(model):
    session = ChatSession(model)
    stop = threading.Event()
    pieces = []
    for piece in session.ask("Tell me everything.", gen=GenerationConfig(max_new_tokens=200, temperature=0),
                             stop_event=stop):
        pieces.append(piece)
        stop.set()
    assert session.stats.stop_reason == "stopped"
    assert session.stats.new_tokens < 10


def test_stats_are_reported(model):
    _, session = ask(model, temperature=0, max_new_tokens=8)
    s = session.stats
    assert s.new_tokens == 8 and s.stop_reason == "max_new_tokens"
    assert s.ttft_s > 0 and s.decode_tokens_per_s > 0 and s.peak_memory_bytes > 0
    assert "tok/s" in s.summary()


def test_generation_stops_when_the_context_is_full(tiny_vila):
    small = load_model(tiny_vila, device="cpu", progress=False, max_context=160)
    session = ChatSession(small)
    session.answer("Hi", gen=GenerationConfig(max_new_tokens=500, temperature=0))
    assert session.stats.stop_reason == "context_full"
    assert session.engine.position == 160


@pytest.fixture(scope="module")
def tokenizer(tiny_vila):
    return Tokenizer(tiny_vila / "llm")


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40))
def test_streaming_never_splits_a_character(tokenizer, text):
    ids = tokenizer.encode(text)
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces) or "\ufffd" in text


def test_multibyte_text_streams_whole_characters(tokenizer):
    text = "Über 東京 🙂 café"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text) / 2  # the emoji and CJK really are split over byte tokens
    decoder = StreamDecoder(tokenizer)
    pieces = [p for p in (decoder.push(i) for i in ids) if p] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("params", [dict(temperature=1e-300), dict(temperature=1e-45), dict(temperature=5e-324),
                                    dict(temperature=0.7, repetition_penalty=1e-300),
                                    dict(temperature=1e-300, repetition_penalty=1e-300, top_p=0.5, top_k=3),
                                    dict(temperature=0, repetition_penalty=1e-300)],
                         ids=["t1e-300", "t1e-45", "t-denormal", "penalty1e-300", "all", "greedy-penalty"])
def test_extreme_settings_draw_a_token_not_nan(params):
    """Dividing by 1e-300 overflows to inf (and inf - inf is NaN): the sampler still draws, and a
    vanishing temperature draws the best token, its limit."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, generator=g) * 3
    hist = torch.tensor([3, 5, 7])
    sampler = Sampler(SamplingParams(seed=1, **params))
    for _ in range(20):
        token = sampler(logits, hist)
        assert 0 <= token < 64
    if params.get("repetition_penalty", 1.0) == 1.0:
        assert {sampler(logits, hist) for _ in range(20)} == {int(logits.argmax())}
    allowed = torch.zeros(64, dtype=torch.bool)
    allowed[10] = True
    assert sampler(logits, hist, allowed) == 10


@pytest.mark.parametrize("field,bad,good", [
    ("max_new_tokens", [0, -1, True, 2.0, None], [1, 4096]),
    ("temperature", [-0.01, 2.01, float("nan"), float("inf"), True, "0.5", None], [0, 1e-300, 2, 1]),
    ("top_p", [0, -0.5, 1.01, float("nan"), False], [1e-6, 1, 0.5]),
    ("top_k", [-1, 1.5, True], [0, 50]),
    ("repetition_penalty", [0, -1, 10.5, float("inf"), float("nan")], [1e-300, 1, 10]),
    ("seed", [2**63, -2**63 - 1, 10**4000, 1.0, True], [None, 0, -1, -2**63, 2**63 - 1]),
    ("stop", ["x", [""], ["a", 3], ["s"] * 17, None], [[], ["</s>"], ["s"] * 16, ("a", "b")]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_generation_config_checks_its_values_once_when_made(field, bad, good):
    """Every caller (the CLI, the apps, the server) builds a GenerationConfig, so its ranges are
    checked here: a bad value is one line naming the field, an EdgeVLMError the CLI prints as is."""
    for value in good:
        assert getattr(GenerationConfig(**{field: value}), field) == value
    for value in bad:
        with pytest.raises(GenerationConfigError) as e:
            GenerationConfig(**{field: value})
        assert isinstance(e.value, EdgeVLMError) and e.value.field == field
        assert str(e.value) == f"{field}: {e.value.reason}" and "\n" not in str(e.value) and len(str(e.value)) < 200


def test_the_cli_options_are_checked_by_generation_config():
    from edge_vlm.cli import build_parser
    from edge_vlm.cli.options import generation_config

    parser = build_parser()
    for flags, field in ((["--temperature", "5"], "temperature"), (["--top-p", "0"], "top_p"),
                         (["--max-new-tokens", "0"], "max_new_tokens"), (["--top-k", "-2"], "top_k"),
                         (["--repetition-penalty", "0"], "repetition_penalty")):
        with pytest.raises(GenerationConfigError) as e:
            generation_config(parser.parse_args(["chat", *flags, "hi"]))
        assert e.value.field == field
