"""The fast paths of the AWQ layer quantizer against the plain ones they replaced.

The plain versions below are the loops the quantizer ran before it was batched (one clipping
ratio, one linear, one column slice at a time). Where the fast path only reorders float32 sums
(batched clipping scores, stacked GPTQ, transposed column sweep), a weight lands on the other side
of a rounding boundary only when it sits within a few ulp of it, so the integer codes agree
except for a handful and the output errors agree to float32 precision; where it computes the
same elementwise operations (fake quantization) it is bit-for-bit.
"""

from __future__ import annotations

import copy

import pytest
import torch

from edge_vlm.quantize import awq
from edge_vlm.quantize.awq import AWQOptions, LayerRunner, quantize_layer_awq
from edge_vlm.quantize.groupwise import QuantizedWeight, fake_quantize, group_grid, quantize_weight, round_to_grid
from edge_vlm.quantize.gptq import _inverse_cholesky, gptq_quantize


# ------------------------------------------------------------------ the plain paths

def plain_search_clip_hessian(w, h, opts):
    """One shrink ratio at a time, a strict `<` keeping the first best."""
    g = opts.group_size
    w = w.float()
    n, k = w.shape
    hb = torch.stack([h[i:i + g, i:i + g] for i in range(0, k, g)]).float()
    if opts.clip_damp:
        diag = hb.diagonal(dim1=1, dim2=2).mean(-1)
        hb = hb + opts.clip_damp * diag[:, None, None] * torch.eye(g)
    wg = w.reshape(n, k // g, g)
    lo_all, hi_all = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    best_lo, best_hi = lo_all.clone(), hi_all.clone()
    best_err = torch.full((n, k // g), float("inf"))
    for i in range(int(opts.max_shrink * opts.clip_grid)):
        ratio = 1 - i / opts.clip_grid
        lo, hi = lo_all * ratio, hi_all * ratio
        d = (quantize_weight(w, g, opts.bits, lo, hi).dequantize() - w).view(n, k // g, g)
        err = torch.einsum("ngi,gij,ngj->ng", d, hb, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


def plain_gptq(w, h, group_size, bits=4, damp=0.01, block=128, group_range=None):
    """The column sweep on w as it is (strided column slices), one linear at a time."""
    w = w.float().clone()
    n, k = w.shape
    block = max(group_size, block // group_size * group_size)
    u = _inverse_cholesky(h, damp)
    w[:, torch.diag(h) <= 0] = 0
    q = torch.zeros(n, k, dtype=torch.uint8)
    scales, zeros = torch.zeros(n, k // group_size), torch.zeros(n, k // group_size)
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        wb, ub = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        err = torch.zeros_like(wb)
        for i in range(b1 - b0):
            col = b0 + i
            g = col // group_size
            if col % group_size == 0:
                grp = wb[:, i:i + group_size]
                lo, hi = (grp.amin(1), grp.amax(1)) if group_range is None else group_range(grp, col)
                scales[:, g], zeros[:, g] = group_grid(lo, hi, bits)
            qi = round_to_grid(wb[:, i], scales[:, g], zeros[:, g], bits)
            q[:, col] = qi.to(torch.uint8)
            e = (wb[:, i] - (qi - zeros[:, g]) * scales[:, g]) / ub[i, i]
            wb[:, i:] -= e[:, None] * ub[i, i:][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return QuantizedWeight(q, zeros.to(torch.uint8), scales.to(torch.float16))


def plain_clipped_range(h, opts):
    g = opts.group_size

    def group_range(grp, col):
        lo, hi = plain_search_clip_hessian(grp, h[col:col + g, col:col + g], opts)
        return lo[:, 0], hi[:, 0]
    return group_range


def plain_quantize_linears(layer, inputs, opts):
    """Every linear on its own: its own factor of H, its own sweep."""
    weights = {}
    for name, lin in awq.layer_linears(layer).items():
        stats = inputs[name]
        clip = opts.clip and name not in awq.NO_CLIP
        qw = plain_gptq(lin.weight, stats.hessian, opts.group_size, opts.bits, opts.gptq_damp,
                        group_range=plain_clipped_range(stats.hessian, opts) if clip else None)
        awq._set(lin.weight, qw.dequantize(torch.float32))
        weights[name] = qw
    return weights


def plain_hessian_loss(w, s, h, opts):
    q = fake_quantize(w * s, opts.group_size, opts.bits) / s
    return float(((q - w) @ h * (q - w)).sum())


# ------------------------------------------------------------------ inputs

def _correlated_inputs(k, tokens=2048, seed=0):
    """Activations with a few outlier channels and correlated columns, as real layers have."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k // 4, generator=gen) @ torch.randn(k // 4, k, generator=gen) / (k // 4) ** 0.5
    x += 0.3 * torch.randn(tokens, k, generator=gen)
    x[:, :3] *= 15
    return x


def _output_error(qw, w, h):
    d = qw.dequantize() - w
    return float((d @ h * d).sum())


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("clipped", [False, True])
def test_fake_quantize_is_quantize_then_dequantize_bit_for_bit(clipped):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 256, generator=gen)
    lo = hi = None
    if clipped:
        wg = w.view(48, -1, 64)
        lo, hi = 0.8 * wg.amin(-1), 0.7 * wg.amax(-1)
    assert torch.equal(fake_quantize(w, 64, 4, lo, hi), quantize_weight(w, 64, 4, lo, hi).dequantize())


@pytest.mark.parametrize("damp", [0.0, 0.1])
def test_batched_clipping_search_picks_the_loops_ranges(damp):
    x = _correlated_inputs(256)
    h = x.t() @ x / x.shape[0]
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    opts = AWQOptions(group_size=64, clip_damp=damp)
    lo, hi = awq.search_clip_hessian(w, h, opts)
    plo, phi = plain_search_clip_hessian(w, h, opts)
    same = (lo == plo) & (hi == phi)
    assert same.float().mean() >= 0.99, same.float().mean()
    # where a near-tie went the other way, the two choices are equally good to float32 precision
    err = lambda a, b: _output_error(quantize_weight(w, 64, 4, a, b), w, h)  # noqa: E731
    assert err(lo, hi) == pytest.approx(err(plo, phi), rel=1e-5)
    assert not torch.equal(lo, w.view(96, -1, 64).amin(-1).clamp(max=0))  # some groups were clipped


@pytest.mark.parametrize("group,clipped", [(64, False), (64, True), (128, True)])
def test_transposed_gptq_sweep_matches_the_plain_sweep(group, clipped):
    k = 384
    x = _correlated_inputs(k, seed=3)
    h = x.t() @ x / x.shape[0]
    w = torch.randn(80, k, generator=torch.Generator().manual_seed(4)) * 0.05
    opts = AWQOptions(group_size=group)
    fast = gptq_quantize(w, h, group, group_range=awq._clipped_range(h, opts) if clipped else None)
    plain = plain_gptq(w, h, group, group_range=plain_clipped_range(h, opts) if clipped else None)
    assert (fast.q == plain.q).float().mean() >= 0.999
    assert (fast.scales == plain.scales).float().mean() >= 0.99
    assert _output_error(fast, w, h) == pytest.approx(_output_error(plain, w, h), rel=1e-3)


def test_stacked_gptq_rows_match_each_linear_alone_with_per_row_clipping():
    """q, k, v stacked: q and k rows keep min-max grids (NO_CLIP), v rows are clipped, as alone."""
    k = 256
    x = _correlated_inputs(k, seed=5)
    h = x.t() @ x / x.shape[0]
    gen = torch.Generator().manual_seed(6)
    ws = {n: torch.nn.Linear(k, rows, bias=False) for n, rows in
          (("self_attn.q_proj", 64), ("self_attn.k_proj", 32), ("self_attn.v_proj", 32))}
    for lin in ws.values():
        lin.weight.data = torch.randn(lin.weight.shape, generator=gen) * 0.05
    opts = AWQOptions(group_size=64)
    stacked = awq._gptq_stacked(ws, tuple(ws), h, opts)
    for name, lin in ws.items():
        clip = name not in awq.NO_CLIP
        alone = plain_gptq(lin.weight, h, 64, group_range=plain_clipped_range(h, opts) if clip else None)
        assert (stacked[name].q == alone.q).float().mean() >= 0.999, name
        assert _output_error(stacked[name], lin.weight, h) == pytest.approx(_output_error(alone, lin.weight, h),
                                                                            rel=1e-3)


def test_chunked_hessian_loss_equals_the_plain_sum(monkeypatch):
    x = _correlated_inputs(128, seed=7)
    h = x.t() @ x / x.shape[0]
    w = torch.randn(300, 128, generator=torch.Generator().manual_seed(8)) * 0.05
    s = torch.rand(128, generator=torch.Generator().manual_seed(9)) + 0.5
    opts = AWQOptions(group_size=64)
    plain = plain_hessian_loss(w, s, h, opts)
    assert awq._hessian_loss(w, s, h, opts) == pytest.approx(plain, rel=1e-5)
    monkeypatch.setattr(awq, "LOSS_CHUNK_ELEMENTS", 128 * 7)  # 7 rows a chunk: the chunks' sum is the whole
    assert awq._hessian_loss(w, s, h, opts) == pytest.approx(plain, rel=1e-5)


def _tiny_layer(kind="llama"):
    from edge_vlm.formats.configs import LLMConfig
    from edge_vlm.models.llm import DecoderLayer

    cfg = LLMConfig(arch=kind, vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=4,
                    num_kv_heads=2, head_dim=32, norm_eps=1e-5, max_position_embeddings=64)
    torch.manual_seed(10)
    layer = DecoderLayer(cfg).float()
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    x = torch.randn(6, 64, 128)
    x[..., :2] *= 10
    return cfg, layer, x


def test_layer_quantized_by_the_fast_paths_matches_the_plain_paths(monkeypatch):
    cfg, layer, x = _tiny_layer()
    runner = LayerRunner(cfg, x.shape[1], "cpu")
    opts = AWQOptions(group_size=64)
    fast_layer = copy.deepcopy(layer)
    fast, fast_out = quantize_layer_awq(fast_layer, cfg, x, runner, opts)
    monkeypatch.setattr(awq, "_quantize_linears", plain_quantize_linears)
    monkeypatch.setattr(awq, "_hessian_loss", plain_hessian_loss)
    plain, plain_out = quantize_layer_awq(copy.deepcopy(layer), cfg, x, runner, opts)
    for name, qw in fast.weights.items():
        assert (qw.q == plain.weights[name].q).float().mean() >= 0.995, name
    assert fast.loss == pytest.approx(plain.loss, rel=0.02)
    assert torch.allclose(fast_out, plain_out, rtol=0, atol=1e-3 * float(plain_out.abs().max()))


@pytest.mark.parametrize("k", [100, 2048 + 300])
def test_gram_from_upper_strips_is_the_full_product(k):
    x = _correlated_inputs(k if k % 4 == 0 else 104, tokens=512, seed=11)[:, :k]
    h = torch.zeros(k, k)
    awq.add_gram_upper(h, x, strip=1024)
    awq.add_gram_upper(h, 2 * x, strip=1024)  # sums in place, batch after batch
    full = awq.symmetric_from_upper(h)
    ref = 5 * x.t() @ x
    assert torch.equal(full, full.t())
    assert torch.allclose(full, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_capture_hessian_is_the_mean_gram_of_every_token():
    cap = awq._Capture(per_batch=16, h_per_batch=10**9, seed=0)
    xs = [torch.randn(2, 50, 64) for _ in range(3)]
    for x in xs:
        cap(None, (x,), None)
    flat = torch.cat([x.reshape(-1, 64) for x in xs])
    assert torch.allclose(cap.hessian, flat.t() @ flat / 300, rtol=1e-5, atol=1e-6)
    assert cap.sample.shape == (48, 64)


def test_inverse_cholesky_adds_damping_until_an_indefinite_h_factors():
    h = torch.tensor([[1.0, 1.05], [1.05, 1.0]])  # eigenvalue -0.05: no factor without extra damping
    u = _inverse_cholesky(h, damp=0.0)
    assert torch.equal(u, u.triu())
    expect = torch.linalg.inv(h + 0.1 * torch.eye(2))  # the first extra step: 0.1 * mean(diag)
    assert torch.allclose(u.t() @ u, expect, rtol=1e-5)


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse():
    x = _correlated_inputs(64, tokens=256, seed=12)
    h = x.t() @ x / 256
    h[5, :] = h[:, 5] = 0  # a dead channel: its diagonal becomes 1
    u = _inverse_cholesky(h, damp=0.01)
    hd = h.double().clone()
    hd[5, 5] = 1
    hd += 0.01 * hd.diagonal().mean() * torch.eye(64, dtype=torch.float64)
    assert torch.allclose((u.t() @ u).double(), torch.linalg.inv(hd), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "nemotron"])
def test_bf16_products_quantize_a_layer_as_well_as_float32_on_held_out_inputs(kind):
    """bf16 rounds each product's inputs to 8 mantissa bits (2^-9 relative); H, GPTQ and the error sums stay
    float32, so the statistics move by ~0.2% and the held-out error of the layer by ~1% either way (measured
    over seeds): well inside 3%."""
    cfg, layer, x = _tiny_layer(kind)
    held = torch.randn(6, 64, 128, generator=torch.Generator().manual_seed(13))
    held[..., :2] *= 10
    runner = LayerRunner(cfg, x.shape[1], "cpu")
    ref = runner(layer, held)
    err = {}
    for matmul in ("fp32", "bf16"):
        q = copy.deepcopy(layer)
        quantize_layer_awq(q, cfg, x, runner, AWQOptions(group_size=64, matmul=matmul))
        err[matmul] = float((runner(q, held) - ref).pow(2).sum() / (ref - held).pow(2).sum())
    assert err["bf16"] == pytest.approx(err["fp32"], rel=0.03), err


def test_auto_matmul_takes_bf16_only_where_it_is_measured_faster():
    from edge_vlm.quantize.matmul_choice import MatmulRates, choose_matmul

    amx, avx2 = MatmulRates(fp32=300, bf16=1500), MatmulRates(fp32=150, bf16=40)
    assert choose_matmul("auto", "cpu", 2560, amx)[0] == "bf16"
    assert choose_matmul("auto", "cpu", 2560, avx2)[0] == "fp32"  # the fallback: emulated bf16
    assert choose_matmul("auto", "cpu", 2560, MatmulRates(fp32=300, bf16=400))[0] == "fp32"  # < 1.5x: not worth it
    assert choose_matmul("auto", "cuda", 2560, amx)[0] == "fp32"  # the fp16 layer; searches in float32
    assert choose_matmul("bf16", "cpu", 2560, avx2)[0] == "bf16"  # asked for: honoured
    with pytest.raises(ValueError, match="bf17"):
        choose_matmul("bf17", "cpu", 2560, amx)


def test_measured_rates_are_real_products():
    from edge_vlm.quantize.matmul_choice import measure_rates

    r = measure_rates(64, "cpu", reps=1)
    assert r.fp32 > 0.1 and r.bf16 > 0.01 and r.fp64 > 0.05 and r.elementwise > 0.01  # GFLOP/s, G passes/s


def test_bf16_mode_rounds_only_the_linears_and_gives_float32_back():
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(5, 64)
    seen = []
    lin.register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))
    with torch.no_grad(), awq.Bf16Linears():
        out = lin(x)
        soft = torch.softmax(x, -1)
        mm = x @ x.t()
    expect = torch.nn.functional.linear(x.bfloat16(), lin.weight.bfloat16()).float() + lin.bias
    assert out.dtype == torch.float32 and torch.equal(out, expect)
    assert torch.equal(soft, torch.softmax(x, -1)) and torch.equal(mm, x @ x.t())  # everything else as it is
    assert seen == [torch.float32]  # hooks (the H capture) see the float32 input


@pytest.mark.parametrize("kind", ["llama", "nemotron"])
def test_mlp_search_loss_from_the_change_matches_the_plain_difference(kind):
    """The MLP candidates are scored from pre-activations + x @ dW^T (the change); in float32 that is the
    plain |block(x, Q(W)) - block(x, W)|^2 to rounding, and with bf16 products it stays within 1% (its
    rounding is relative to the change), where bf16(out_q) - bf16(out) was mostly rounding."""
    cfg, layer, x = _tiny_layer(kind)
    mlp = layer.mlp
    block = awq._MLPBlock(mlp)
    ws = [m.weight.float() for m in ((mlp.gate_proj, mlp.up_proj) if mlp.gated else (mlp.up_proj,))]
    x = x.reshape(-1, 128)[:256]
    plain_ref = block(x, ws)
    state = block.reference(x, ws)
    for seed in range(3):
        s = torch.rand(128, generator=torch.Generator().manual_seed(seed)) + 0.5
        q = [fake_quantize(w * s, 64) / s for w in ws]
        plain = float((block(x, q) - plain_ref).pow(2).mean())
        change = float(block.change(state, x, [a - b for a, b in zip(q, ws)]).pow(2).mean())
        assert change == pytest.approx(plain, rel=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = float(block.change(state, x, [a - b for a, b in zip(q, ws)]).float().pow(2).mean())
        assert low == pytest.approx(plain, rel=0.01)
