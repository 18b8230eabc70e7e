"""The llama.cpp engine against our torch engine, on the real SmolLM2-135M and its own GGUF.

The GGUF holds Q4_1 (and Q8_0) weights; our folder holds the same values dequantized to fp16.
llama.cpp also quantizes activations to 8 bits inside its dot products (an error of about
2^-8 relative per product, summed over hundreds of terms), so logits agree closely but not to
float precision: compared by cosine and by rank, not elementwise. Inside llama.cpp itself
(rewind, tokens vs the same rows as embeddings) results must be exact or nearly so.
"""

from __future__ import annotations

import pytest
import torch

from edge_vlm import load_model
from edge_vlm.backends.llamacpp.engine import LlamaCppEngine
from edge_vlm.benchmarks.real_model import gguf_path
from edge_vlm.contracts import Prompt
from edge_vlm.backends.torch_engine import TorchEngine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(smollm2):
    model = load_model(smollm2, device="cpu", progress=False, fast_path=False)
    return model, LlamaCppEngine(gguf_path(), 256), TorchEngine(model.llm, 256)


def prompt_ids(model, question="What is the capital of France?"):
    return model.tokenizer.encode(model.template.render([{"role": "user", "content": question}]))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def test_prefill_and_steps_agree_with_the_torch_engine(pair):
    model, fast, ref = pair
    ids = prompt_ids(model)
    fast.reset(), ref.reset()
    got, want = fast.prefill(Prompt([ids])), ref.prefill(Prompt([ids]))
    assert got.shape == want.shape == (model.llm.cfg.vocab_size,) and got.dtype == torch.float32
    assert cosine(got, want) > 0.99
    assert int(want.argmax()) in got.topk(3).indices.tolist()
    for token in model.tokenizer.encode(" The capital of France is Paris."):  # teacher-forced steps
        got, want = fast.step(token), ref.step(token)
        assert cosine(got, want) > 0.99
    assert fast.position == ref.position


def test_embeddings_in_place_of_tokens_and_rewind(pair):
    model, fast, _ = pair
    ids = prompt_ids(model, "Name three colours.")
    fast.reset()
    as_tokens = fast.prefill(Prompt([ids]))
    fast.reset()
    rows = model.llm.embed(torch.tensor(ids))  # the same table, fp16-rounded: what an image's rows go in as
    as_rows = fast.prefill(Prompt(embeddings=rows[None]))
    assert cosine(as_rows, as_tokens) > 0.999 and int(as_rows.argmax()) == int(as_tokens.argmax())
    # a prompt split into token, embedding and token pieces sits at the right positions
    fast.reset()
    mixed = fast.prefill(Prompt([ids[:5], ids[9:]], images=rows[5:9][None]))
    assert cosine(mixed, as_tokens) > 0.999 and fast.position == len(ids)
    # rewinding the cache and running the same tokens again gives the same logits (the cells past 7
    # are reused but the last: only the batch split differs, see the reuse test below)
    fast.reset()
    fast.prefill(Prompt([ids[:7]]))
    first = fast.prefill(Prompt([ids[7:]]))
    fast.rewind(7)
    again = fast.prefill(Prompt([ids[7:]]))
    assert fast.position == len(ids) and fast.reused_tokens == len(ids) - 8
    assert cosine(again, first) > 0.99999 and int(again.argmax()) == int(first.argmax())


def test_int8_kv_cache_is_llama_cpp_q8_0(pair):
    """`--kv-cache int8` on llama.cpp: its Q8_0 K/V cache (34 bytes per 32 values, so the KV part
    of the state shrinks by 17/32) with logits that agree with the F16 cache's (Q8_0 keeps a
    value to 1/254 of its block's maximum, and flash attention, which it needs, sums in another
    order: measured cosine 0.99976-0.99994 here)."""
    model, fast, _ = pair
    ids = prompt_ids(model, "Tell me a long story about a lighthouse keeper and a storm. " * 12)
    int8 = LlamaCppEngine(gguf_path(), 256, kv_cache_int8=True)
    fast.reset()
    want, got = fast.prefill(Prompt([ids])), int8.prefill(Prompt([ids]))
    assert cosine(got, want) > 0.999 and int(want.argmax()) in got.topk(3).indices.tolist()
    logits_bytes = 4 * model.llm.cfg.vocab_size
    kv16, kv8 = fast.state_bytes - logits_bytes, int8.state_bytes - logits_bytes
    assert kv8 < 0.6 * kv16  # 17/32 = 0.53 of the cells' bytes; the state's own headers differ a little
    int8.close()


def test_errors_are_one_clear_line(tmp_path):
    from edge_vlm.errors import EdgeVLMError

    with pytest.raises(EdgeVLMError, match="GGUF file not found"):
        LlamaCppEngine(tmp_path / "none.gguf", 64)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(EdgeVLMError, match="cannot load"):
        LlamaCppEngine(bad, 64)


def test_a_prompt_that_starts_like_the_cached_one_reuses_its_cells_exactly(pair):
    """A new conversation after a rewind to 0 runs only what differs from the cells still there
    (the system prompt and markup are kept), and its logits are a fresh engine's. Bound: cosine
    > 0.99999 and the same argmax (the cells hold what a fresh prefill computes; only the batch
    split differs, and llama.cpp's CPU kernels were measured bit-exact across splits of prompts
    under 64 tokens on the AVX512 machine; another CPU's kernels may round a split differently).
    Cells past the match are removed first: the step after a shorter prompt is a fresh one's too."""

    def same(x, y):
        return cosine(x, y) > 0.99999 and int(x.argmax()) == int(y.argmax())

    model, fast, _ = pair
    a, b = prompt_ids(model, "Name three fruits."), prompt_ids(model, "What is the capital of France?")
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared > 10 and len(b) < 64
    fresh = LlamaCppEngine(gguf_path(), 256)
    try:
        fast.reset()
        fast.prefill(Prompt([a]))
        fast.step(int(fast._logits().argmax()))
        fast.rewind(0)
        got = fast.prefill(Prompt([b]))
        assert fast.reused_tokens == shared and fast.position == len(b)
        assert same(got, fresh.prefill(Prompt([b])))
        assert same(fast.step(7), fresh.step(7))
        # the same prompt again: all but its last token come from the cache
        fast.rewind(0)
        assert same(fast.prefill(Prompt([b])), got) and fast.reused_tokens == len(b) - 1
        # a shorter prompt, then a step: the longer prompt's cells past it are gone
        fast.rewind(0)
        fresh.reset()
        short = b[:shared + 2]
        assert same(fast.prefill(Prompt([short])), fresh.prefill(Prompt([short])))
        assert same(fast.step(11), fresh.step(11))
        # an embedding piece reuses nothing of the cells it lands on
        fast.rewind(0)
        rows = model.llm.embed(torch.tensor(b[:4]))
        fast.prefill(Prompt([[], b[4:]], images=rows[None]))
        assert fast.reused_tokens == 0 and fast.position == len(b)
    finally:
        fresh.close()


def test_engines_over_one_file_share_its_weights_and_keep_their_own_caches(pair):
    """Two sessions of one model: one llama.cpp model in memory, two contexts. Each decodes as if alone
    (the same logits as a fresh engine), one closing leaves the other working, and the last frees it."""
    from edge_vlm.backends.llamacpp.engine import SHARED_MODELS

    model, _, _ = pair
    before = len(SHARED_MODELS.held)
    a, b = LlamaCppEngine(gguf_path(), 128), LlamaCppEngine(gguf_path(), 128)
    assert a._llama.model == b._llama.model and a._llama.ctx != b._llama.ctx
    assert SHARED_MODELS.held[a._llama.model_key][1] >= 2
    one, two = prompt_ids(model, "Name a fruit."), prompt_ids(model, "Name a planet.")
    alone = LlamaCppEngine(gguf_path(), 128)
    want_one, want_two = alone.prefill(Prompt([one])), (alone.reset(), alone.prefill(Prompt([two])))[1]
    alone.close()
    got_one, got_two = a.prefill(Prompt([one])), b.prefill(Prompt([two]))  # interleaved: caches apart
    assert torch.equal(got_one, want_one) and torch.equal(got_two, want_two)
    a.close()
    b.reset()
    assert torch.equal(b.prefill(Prompt([two])), want_two)
    b.close()
    assert len(SHARED_MODELS.held) == before
