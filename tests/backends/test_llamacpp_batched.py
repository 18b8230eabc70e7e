"""Several sequences decoded together on one llama.cpp context, against lone engines.

Each sequence attends only to its own KV cells, so batching must not change what a sequence
computes. llama.cpp's CPU kernels may still round a row differently when the batch shape
changes (a different tiling of the same dot products), so logits are compared by cosine and
argmax, and greedy answers over short spans token for token.
"""

from __future__ import annotations

import threading

import pytest
import torch

from edge_vlm import ChatSession, EdgeVLMError, GenerationConfig, load_model
from edge_vlm.backends.llamacpp.batched import BatchedContext
from edge_vlm.backends.llamacpp.engine import LlamaCppEngine
from edge_vlm.benchmarks.real_model import gguf_path
from edge_vlm.contracts import Prompt

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
             "What is 12 times 7?"]


@pytest.fixture(scope="module")
def model(smollm2):
    return load_model(smollm2, device="cpu", progress=False, fast_path=False)


def ids_of(model, question):
    return model.tokenizer.encode(model.template.render([{"role": "user", "content": question}]))


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def greedy(engine, ids, steps):
    """Greedy tokens and every logits row, prefill then `steps` steps."""
    logits = engine.prefill(Prompt([ids]))
    tokens, rows = [], [logits]
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        logits = engine.step(tokens[-1])
        rows.append(logits)
    return tokens, rows


def in_threads(fn, n):
    out, errors = [None] * n, []

    def run(i):
        try:
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return out


def test_slots_decoded_together_match_lone_engines(model):
    lone = LlamaCppEngine(gguf_path(), 256)
    want = []
    for q in QUESTIONS:
        lone.reset()
        want.append(greedy(lone, ids_of(model, q), 12))
    # a long gather window: every step of every slot waits for the others, so they share decodes
    ctx = BatchedContext(gguf_path(), slots=len(QUESTIONS), max_context=256, gather_s=30)

    def run(i):
        try:
            return greedy(ctx.engines[i], ids_of(model, QUESTIONS[i]), 12)
        finally:
            ctx.engines[i].idle()

    try:
        got = in_threads(run, len(QUESTIONS))
    finally:
        ctx.close()
    for (tokens, rows), (want_tokens, want_rows) in zip(got, want):
        assert tokens == want_tokens
        assert all(cosine(a, b) > 0.9999 for a, b in zip(rows, want_rows))
    steps = len(QUESTIONS) * 13
    assert ctx.decoded_rows >= steps and ctx.decodes <= steps - len(QUESTIONS)  # rows really shared decodes
    assert ctx.shared_decodes >= 12 - 1


def test_rewind_of_one_slot_leaves_the_others(model):
    ctx = BatchedContext(gguf_path(), slots=2, max_context=128, gather_s=0.0)
    a, b = ctx.engines
    ids_a, ids_b = ids_of(model, QUESTIONS[0]), ids_of(model, QUESTIONS[1])
    first_a = a.prefill(Prompt([ids_a]))
    b.prefill(Prompt([ids_b]))
    a.step(int(first_a.argmax()))
    a.rewind(len(ids_a) - 1)  # take the prompt's last token and the step back, run it again
    again = a.prefill(Prompt([ids_a[-1:]]))
    assert a.position == len(ids_a) and torch.equal(again.argmax(), first_a.argmax())
    assert cosine(again, first_a) > 0.9999
    lone = LlamaCppEngine(gguf_path(), 128)
    want = lone.prefill(Prompt([ids_b + [7]]))
    assert cosine(b.step(7), want) > 0.9999  # b's cells were untouched by a's rewind
    with pytest.raises(ValueError, match="exceed the context"):
        a.prefill(Prompt([[1] * 200]))
    ctx.close()
    with pytest.raises(EdgeVLMError, match="closed"):
        a.step(1)


@pytest.fixture(scope="module")
def model_lc(smollm2):
    return load_model(smollm2, device="cpu", progress=False, llm_backend="llama.cpp")


def test_sessions_on_slots_answer_like_sessions_on_their_own(model_lc):
    """The whole chat path (template, sampler, stop strings) on slot engines, four at once,
    sampling with seeds: the same answers as one session answering them in turn."""
    gen = [GenerationConfig(max_new_tokens=16, temperature=0.8, seed=i) for i in range(len(QUESTIONS))]
    model = model_lc
    alone = ChatSession(model, max_context=256)
    want = []
    for q, g in zip(QUESTIONS, gen):
        alone.reset()
        want.append(alone.answer(q, gen=g))
    ctx = BatchedContext(model.gguf_path, slots=len(QUESTIONS), max_context=256, gather_s=30)
    sessions = [ChatSession(model, engine=e) for e in ctx.engines]

    def ask(i):
        try:
            return sessions[i].answer(QUESTIONS[i], gen=gen[i])
        finally:
            ctx.engines[i].idle()

    try:
        assert in_threads(ask, len(QUESTIONS)) == want
    finally:
        ctx.close()
    assert all(s.stats.backend == "llama.cpp" for s in sessions)


def test_tokens_drawn_in_the_decode_thread_answer_like_sessions_on_their_own(model_lc, monkeypatch):
    """With plans (the server's --parallel), the decode thread draws every lane's tokens after the
    first and feeds each into the next decode before the lane has seen it. Seeded, greedy, with a
    repetition penalty, cut by a stop string and by max_new_tokens: the same answers as one
    session answering alone, a second turn after a stop string (whose token fed ahead was taken
    out of the cache) included; and the draws really happen in the decode thread."""
    from edge_vlm.backends.llamacpp import batched

    model = model_lc
    gen = [GenerationConfig(max_new_tokens=20, temperature=0.8, seed=1),
           GenerationConfig(max_new_tokens=12, temperature=0),
           GenerationConfig(max_new_tokens=16, temperature=0.7, seed=5, repetition_penalty=1.3),
           GenerationConfig(max_new_tokens=24, temperature=0, stop=[","])]
    follow = "And then?"
    alone = ChatSession(model, max_context=256)
    want = []
    for q, g in zip(QUESTIONS, gen):
        alone.reset()
        first = alone.answer(q, gen=g)
        want.append((first, alone.answer(follow, gen=g)))
    threads = []
    real_draw = batched.Plan.draw
    monkeypatch.setattr(batched.Plan, "draw", lambda self, logits: threads.append(
        threading.current_thread().name) or real_draw(self, logits))
    ctx = BatchedContext(model.gguf_path, slots=len(QUESTIONS), max_context=256, gather_s=30)
    sessions = [ChatSession(model, engine=e) for e in ctx.engines]

    def ask(i):
        engine = ctx.engines[i]
        try:
            engine.plan(gen[i], model.eos_token_ids)
            first = sessions[i].answer(QUESTIONS[i], gen=gen[i])
            engine.idle()
            engine.plan(gen[i], model.eos_token_ids)
            return first, sessions[i].answer(follow, gen=gen[i])
        finally:
            engine.idle()

    try:
        assert in_threads(ask, len(QUESTIONS)) == want
    finally:
        ctx.close()
    assert threads.count("edge-vlm-llama-decode") > len(threads) // 2
    assert ctx.shared_decodes > 0


def test_a_constrained_answer_has_no_plan_and_its_lane_samples(model_lc):
    """The fallback: a grammar mask needs the lane's own sampler; its answer is the lone one."""
    model = model_lc
    g = GenerationConfig(max_new_tokens=12, temperature=0, constraint=["yes", "no"])
    alone = ChatSession(model, max_context=256)
    want = alone.answer("Is the sky blue?", gen=g)
    ctx = BatchedContext(model.gguf_path, slots=1, max_context=256)
    try:
        engine = ctx.engines[0]
        engine.plan(g, model.eos_token_ids)
        assert engine._gen is None  # no plan: the constraint's mask is applied in the lane
        got = ChatSession(model, engine=engine).answer("Is the sky blue?", gen=g)
    finally:
        ctx.close()
    assert got == want and got in ("yes", "no")


def test_a_slot_reuses_the_cells_of_a_prompt_that_starts_the_same(model):
    a, b = ids_of(model, QUESTIONS[0]), ids_of(model, QUESTIONS[1])
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    ctx = BatchedContext(gguf_path(), slots=2, max_context=128, gather_s=0.0)
    lone = LlamaCppEngine(gguf_path(), 128)
    try:
        slot = ctx.engines[0]
        slot.prefill(Prompt([a]))
        slot.step(5)
        slot.rewind(0)
        got = slot.prefill(Prompt([b]))
        assert slot.reused_tokens == shared > 10 and slot.position == len(b)
        want = lone.prefill(Prompt([b]))
        assert cosine(got, want) > 0.99999 and int(got.argmax()) == int(want.argmax())
        assert cosine(slot.step(9), lone.step(9)) > 0.99999  # the old cells past the match were removed
    finally:
        ctx.close()
        lone.close()
