"""The real SmolLM2-135M-Instruct through our runtime vs transformers on the same weights.

float32 on both sides. Greedy tokens must be identical; perplexity must agree to 1e-3
relative (the per-token log-probs differ only by float32 rounding, ~1e-6).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edge_vlm import ChatSession, GenerationConfig, load_model
from edge_vlm.generate import AnswerText, generate
from edge_vlm.backends.torch_engine import TorchEngine
from edge_vlm.models.perplexity import perplexity
from edge_vlm.quantize.calibration import held_out_text

QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def ours(smollm2):
    return load_model(smollm2, device="cpu", progress=False)


@pytest.fixture(scope="module")
def reference(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2)


def test_prompt_and_greedy_answer_match_transformers(ours, reference):
    ref, ref_tok = reference
    messages = [{"role": "user", "content": QUESTION}]
    ref_ids = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ref_ids, dict) or hasattr(ref_ids, "input_ids"):
        ref_ids = ref_ids["input_ids"]
    our_ids = ours.tokenizer.encode(ours.template.render(messages))
    assert our_ids == list(ref_ids)
    with torch.no_grad():
        expected = ref.generate(torch.tensor([ref_ids]), max_new_tokens=40, do_sample=False)[0, len(ref_ids):].tolist()
    engine = TorchEngine(ours.llm, 512)
    ending = AnswerText(ours.tokenizer, ours.eos_token_ids, [])
    list(generate(engine, ours.llm.embed(torch.tensor([our_ids])), GenerationConfig(max_new_tokens=40, temperature=0),
                  ending))
    got = ending.tokens
    eos = set(ours.eos_token_ids)
    assert got == [t for t in expected if t not in eos][:len(got)] and len(got) >= len(expected) - 1
    answer = ChatSession(ours).answer(QUESTION, gen=GenerationConfig(max_new_tokens=40, temperature=0))
    assert answer == ref_tok.decode(expected, skip_special_tokens=True)
    assert "Paris" in answer


def test_perplexity_matches_transformers(ours, reference):
    ref, _ = reference
    ids = ours.tokenizer.encode(held_out_text())[:2048]  # text the quantizer never calibrates on
    ppl = perplexity(ours.llm, ids, window=512)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 512):
            chunk = torch.tensor([ids[start:start + 512]])
            logits = ref(chunk).logits[0]
            nll += float(F.cross_entropy(logits[:-1], chunk[0, 1:], reduction="sum"))
            count += chunk.shape[1] - 1
    expected = math.exp(nll / count)
    assert abs(ppl - expected) / expected <= 1e-3
    assert 5 < ppl < 100  # a real model on English prose, not noise


def test_vila_layout_with_real_llm_runs_image_chat(smollm2, tmp_path):
    from skimage import data

    from tests.factories import make_vila

    # SigLIP geometry of VILA1.5 (384 px, patch 14 -> 729 patches -> 196 tokens), narrow and shallow
    make_vila(tmp_path / "vila", llm_folder=smollm2, image_size=384, patch_size=14, hidden_size=64,
              intermediate_size=96, num_hidden_layers=3)
    model = load_model(tmp_path / "vila", device="cpu", progress=False)
    assert model.tokens_per_image == 196
    session = ChatSession(model)
    text_session = ChatSession(model)
    text_session.answer(QUESTION, gen=GenerationConfig(max_new_tokens=1, temperature=0))
    answer = session.answer(QUESTION, images=[data.chelsea()], gen=GenerationConfig(max_new_tokens=12, temperature=0))
    assert session.stats.prompt_tokens == text_session.stats.prompt_tokens + 196 + len(model.tokenizer.encode("\n"))
    assert session.stats.new_tokens > 0 and answer.strip()
    # the second turn reuses the cache and still answers
    assert session.answer("Thanks!", gen=GenerationConfig(max_new_tokens=8, temperature=0)).strip()
