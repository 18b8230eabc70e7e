"""Our decoder vs transformers' on tiny random checkpoints saved in the real layout.

float32 throughout: both sides do the same math in a different order, so the expected
difference is accumulated rounding, ~1e-6 relative; 1e-4 leaves room while still catching any
real mistake (a wrong rotary half, a missing +1 in LayerNorm1P, a dropped bias move logits by
1e-2 or more).
"""

from __future__ import annotations

import pytest
import torch

from edge_vlm.generate import AnswerText, GenerationConfig, generate
from edge_vlm.backends.torch_engine import TorchEngine
from edge_vlm.loading import load_model
from tests.factories import make_llm

CONFIGS = {
    "llama-gqa": ("llama", {}),
    "llama-mha": ("llama", dict(num_key_value_heads=4)),
    "llama-gqa6to1-odd": ("llama", dict(hidden_size=72, num_attention_heads=6, num_key_value_heads=1,
                                         intermediate_size=100, num_hidden_layers=3)),
    "llama3-rope-scaling-tied": ("llama", dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "qwen2-bias-gqa": ("qwen2", dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "nemotron-partial-0.5": ("nemotron", {}),
    "nemotron-head-dim-gqa": ("nemotron", dict(hidden_size=72, num_attention_heads=6, num_key_value_heads=3,
                                               head_dim=16, partial_rotary_factor=0.5)),
    "nemotron-partial-0.25": ("nemotron", dict(partial_rotary_factor=0.25, num_key_value_heads=4)),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    kind, over = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    ref = make_llm(folder, kind, seed=len(request.param), **over)
    return ref, load_model(folder, device="cpu", progress=False)


def test_logits_match_transformers(pair):
    ref, ours = pair
    ids = torch.randint(0, ref.config.vocab_size, (1, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    got = ours.llm(ours.llm.embed(ids), ours.llm.new_cache(64), all_logits=True)
    assert rel_err(got, expected) <= 1e-4


def test_cached_decode_matches_full_forward(pair):
    """The static KV cache (prefill a prefix, then one token at a time) equals one full pass."""
    _, ours = pair
    llm = ours.llm
    ids = torch.randint(0, llm.cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    full = llm(llm.embed(ids), llm.new_cache(64), all_logits=True)[0]
    cache = llm.new_cache(64)
    steps = [llm(llm.embed(ids[:, :11]), cache, all_logits=True)[0]]
    steps += [llm(llm.embed(ids[:, t:t + 1]), cache)[0] for t in range(11, 30)]
    assert rel_err(torch.cat(steps), full) <= 1e-4


def test_greedy_generation_matches_transformers(pair):
    ref, ours = pair
    ids = torch.randint(3, ref.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0,
                                min_new_tokens=24)[0, 9:].tolist()
    engine = TorchEngine(ours.llm, 64)
    answer = AnswerText(ours.tokenizer, set(), [])  # no EOS, no stop strings: all 24 tokens
    list(generate(engine, ours.llm.embed(ids), GenerationConfig(max_new_tokens=24, temperature=0), answer))
    assert answer.tokens == expected
