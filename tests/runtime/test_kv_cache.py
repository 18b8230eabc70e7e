"""The int8 KV cache: its quantization bound, its size, and what it does to a model's outputs."""

from __future__ import annotations

import pytest
import torch

from edge_vlm.models.kv_cache import StaticKVCache, kv_cache_bytes
from edge_vlm.formats.int8_rows import dequantize_int8_rows, quantize_int8_rows


def test_quantized_vectors_are_within_half_a_step():
    x = torch.randn(3, 5, 7, 64, generator=torch.Generator().manual_seed(0)) * torch.rand(3, 5, 7, 1) * 10
    q, scale = quantize_int8_rows(x)
    assert q.dtype == torch.int8 and scale.shape == x.shape[:-1]
    assert (q.abs().amax(-1) == 127).all()  # each vector's largest element uses the full range
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((dequantize_int8_rows(q, scale, torch.float32) - x).abs() <= step / 2 * (1 + 1e-6)).all()


def test_int8_cache_returns_what_it_stored_and_halves_the_bytes():
    shape = dict(num_layers=2, num_kv_heads=3, max_context=16, head_dim=64, dtype=torch.float16, device="cpu")
    plain, int8 = StaticKVCache(**shape), StaticKVCache(**shape, quantized=True)
    k = torch.randn(1, 3, 5, 64, generator=torch.Generator().manual_seed(1)).half()
    v = torch.randn(1, 3, 5, 64, generator=torch.Generator().manual_seed(2)).half()
    int8.write(0, k, v)
    int8.advance(5)
    k2, v2 = k[:, :, :2] * 3, v[:, :, :2] * 3
    kq, vq = int8.write(0, k2, v2)  # the prefix 0..6, dequantized, new tokens included
    assert kq.shape == (1, 3, 7, 64) and kq.dtype == torch.float16
    want_k = torch.cat([k, k2], 2).float()
    step = want_k.abs().amax(-1, keepdim=True) / 127
    assert ((kq.float() - want_k).abs() <= step / 2 + 2**-11 * want_k.abs()).all()  # + the fp16 result rounding
    assert int8.nbytes == kv_cache_bytes(2, 3, 64, 16, 2, quantized=True) == 2 * 2 * 3 * 16 * (64 + 4)
    assert plain.nbytes == kv_cache_bytes(2, 3, 64, 16, 2)
    assert int8.nbytes / plain.nbytes == pytest.approx(68 / 128)


def _tiny_llm(tmp_path):
    from edge_vlm.loading import load_model
    from tests.factories import make_llm

    make_llm(tmp_path / "llm", "llama", seed=7)
    return load_model(tmp_path / "llm", device="cpu", progress=False).llm


def test_model_with_an_int8_cache_stays_close_and_chunking_does_not_matter(tmp_path):
    llm = _tiny_llm(tmp_path)
    ids = torch.randint(0, llm.cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = llm(llm.embed(ids), llm.new_cache(32), all_logits=True)[0]
        whole = llm(llm.embed(ids), llm.new_cache(32, quantized=True), all_logits=True)[0]
        cache = llm.new_cache(32, quantized=True)
        llm(llm.embed(ids[:, :12]), cache)
        chunked = llm(llm.embed(ids[:, 12:]), cache, all_logits=True)[0]
    # each vector is quantized on its own, so prefill in one piece or two stores the same cache
    assert torch.allclose(chunked, whole[12:], rtol=1e-5, atol=1e-5)
    # K/V off by <= 1/254 of each vector's max: logits move by a small fraction of their range
    err = float((whole - full).abs().max() / full.abs().max())
    assert 0 < err < 0.02


def test_load_model_kv_cache_option_sets_what_engines_build(tmp_path):
    from edge_vlm.errors import EdgeVLMError
    from edge_vlm.backends.torch_engine import TorchEngine
    from edge_vlm.loading import load_model
    from tests.factories import make_llm

    make_llm(tmp_path / "llm", "llama", seed=7)
    model = load_model(tmp_path / "llm", device="cpu", progress=False, kv_cache="int8")
    assert model.spec.kv_cache_int8 and model.new_engine(64).cache.quantized
    assert not TorchEngine(model.llm, 64).cache.quantized  # the engine's own default: the model's dtype
    plain = load_model(tmp_path / "llm", device="cpu", progress=False)
    est, est8 = plain.memory_estimate(4096)["kv_cache"], model.memory_estimate(4096)["kv_cache"]
    d = model.llm.cfg.head_dim
    assert est8 / est == pytest.approx((d + 4) / (4 * d))  # fp32 on CPU: D + 4 bytes a vector against 4 D
    with pytest.raises(EdgeVLMError, match="kv_cache"):
        load_model(tmp_path / "llm", device="cpu", progress=False, kv_cache="int4")


@pytest.mark.slow  # ~15 s: the real SmolLM2, 1024 held-out tokens, scored twice
def test_int8_cache_keeps_real_smollm2_perplexity(smollm2):
    from edge_vlm.loading import load_model
    from edge_vlm.models.perplexity import perplexity
    from edge_vlm.text.tokenizer import Tokenizer
    from edge_vlm.quantize.calibration import held_out_text

    ids = Tokenizer(smollm2).encode(held_out_text()[:20_000])[:1024]
    model = load_model(smollm2, device="cpu", progress=False)
    base = perplexity(model.llm, ids, window=512)
    int8 = perplexity(model.llm, ids, window=512, kv_cache_int8=True)
    # per-vector int8 K/V: a rounding of <= 1/254 of each vector's max, random in sign; measured
    # +0.3% here (8.896 -> 8.923). 1% still tells it from a broken cache (wrong scales give perplexity in the hundreds)
    assert base < 20 and abs(int8 - base) <= 0.01 * base, (base, int8)


def test_the_cache_owns_its_position():
    """Only advance() moves the position and only truncate() takes it back; writes land at it."""
    cache = StaticKVCache(num_layers=1, num_kv_heads=1, max_context=8, head_dim=4, dtype=torch.float32, device="cpu")
    ones = torch.ones(1, 1, 3, 4)
    k, _ = cache.write(0, ones, ones)
    assert cache.position == 0 and k.shape[2] == 3  # written, not yet counted: the model counts after its last layer
    cache.advance(3)
    k, _ = cache.write(0, ones * 2, ones * 2)
    assert k[0, 0, :, 0].tolist() == [1, 1, 1, 2, 2, 2]
    cache.advance(3)
    with pytest.raises(ValueError, match="exceed the cache size 8"):
        cache.advance(3)
    cache.truncate(4)
    assert cache.position == 4
    cache.truncate(10)  # never forward
    assert cache.position == 4
    with pytest.raises(AttributeError):
        cache.position = 7
