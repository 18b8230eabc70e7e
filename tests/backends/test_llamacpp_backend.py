"""`load_model(..., llm_backend="llama.cpp")` end to end: the VILA folder pairing the real
SmolLM2 with a random SigLIP tower answers through llama.cpp, with the image embeddings at the
positions the torch path puts them (the logits after an image prompt agree), multi-turn cache
reuse and rewind. Tolerances as in test_llamacpp_engine.py: llama.cpp runs a Q8_0 export of the
fp16 weights with 8-bit activations in its dot products, so logits are compared by cosine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edge_vlm import ChatSession, GenerationConfig, load_model
from edge_vlm.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(real_vila, tmp_path_factory):
    cache = tmp_path_factory.mktemp("edge-vlm-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGE_VLM_CACHE", str(cache))
    fast = load_model(real_vila, device="cpu", progress=False, llm_backend="llama.cpp")
    ref = load_model(real_vila, device="cpu", progress=False, fast_path=False)
    yield fast, ref, cache
    mp.undo()


def first_logits(session: ChatSession, text: str, images=()) -> torch.Tensor:
    seen = []
    real = session.engine.prefill
    session.engine.prefill = lambda prompt: seen.append(real(prompt)) or seen[-1]
    try:
        session.answer(text, images=images, gen=GenerationConfig(max_new_tokens=1, temperature=0))
    finally:
        session.engine.prefill = real
    return seen[-1]


def cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def photo(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (80, 96, 3), dtype=np.uint8))


def test_image_prompt_logits_match_the_torch_path(models):
    fast, ref, cache = models
    assert fast.info.llm_backend == "llama.cpp" and fast.gguf_path.is_file() and cache in fast.gguf_path.parents
    a, b = ChatSession(fast), ChatSession(ref)
    assert a.engine.name == "llama.cpp"
    got, want = first_logits(a, "What is in this picture?", [photo()]), first_logits(b, "What is in this picture?", [photo()])
    assert cosine(got, want) > 0.99
    # the image matters, and it matters the same way: another picture moves both alike
    other_got = first_logits(a.__class__(fast), "What is in this picture?", [photo(1)])
    other_want = first_logits(b.__class__(ref), "What is in this picture?", [photo(1)])
    assert cosine(other_got - got, other_want - want) > 0.9
    assert a.stats.backend == "llama.cpp" and "LLM on llama.cpp" in a.stats.summary()


def test_multi_turn_reuse_and_rewind_through_llama_cpp(models):
    fast, ref, _ = models
    a, b = ChatSession(fast), ChatSession(ref)
    for s in (a, b):
        s.answer("Describe <image>", images=[photo(2)], gen=GenerationConfig(max_new_tokens=4, temperature=0))
    position = a.position
    got, want = first_logits(a, "And the colours?"), first_logits(b, "And the colours?")
    assert a.stats.prompt_tokens < 30  # only the new turn ran: the image turn stayed in llama.cpp's cache
    assert a.turns[0].answer == b.turns[0].answer or cosine(got, want) > 0.95  # greedy may part on near-ties
    a.rewind(1)
    assert a.position == position
    again = first_logits(a, "And the colours?")
    assert torch.equal(again, got)  # the same cells, the same batches: the same logits


def test_cli_backend_option_and_info(real_vila, models, capsys):
    assert main(["info", str(real_vila), "--backend", "llama.cpp"]) == 0
    assert "LLM backend:   llama.cpp (llama-cpp-python installed)" in capsys.readouterr().out
    assert main(["chat", "--model", str(real_vila), "--backend", "llama.cpp", "--temperature", "0",
                 "--max-new-tokens", "4", "Hello"]) == 0
    assert "LLM on llama.cpp" in capsys.readouterr().err
