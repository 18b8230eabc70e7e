"""The evaluation split stays honest, the calibration mix is what it says, and the new rounding,
loss and sharding code agrees with the plain definitions it replaces."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from edge_vlm.benchmarks.text_domains import DOMAINS, domain_ids
from edge_vlm.quantize.calibration import SOURCES, builtin_blocks, mix_counts


def _top(module: str) -> str:
    return module.split(".")[0]


def _dist(name: str) -> str:
    return name.lower().replace("-", "_")


def test_no_calibration_source_is_an_evaluation_source():
    from edge_vlm.quantize.calibration import README_DISTS

    stdlib = {m for s in SOURCES.values() if s.name != "readmes" for m in s.modules}
    assert all(_top(m) in sys.stdlib_module_names for m in stdlib)  # prose, code, chat: the standard library
    assert SOURCES["readmes"].modules == README_DISTS
    calib = {_top(m) for m in stdlib} | {_dist(d) for d in README_DISTS}
    for d in DOMAINS.values():
        top = {_top(m) for m in d.modules} | {_dist(m) for m in d.modules}
        assert not top & calib, (d.name, top & calib)
        assert not top & sys.stdlib_module_names, d.name  # evaluation reads third-party packages only


def _long_lines(text: str) -> set[str]:
    return {ln.strip() for ln in text.splitlines() if len(ln.strip()) >= 60}


def test_no_calibration_text_appears_in_an_evaluation_domain():
    """Line by line: a sentence or code line of 60+ characters from any calibration source must not
    occur in any evaluation domain (a domain reading a calibration source would fail this)."""
    calib = set()
    for s in SOURCES.values():
        calib |= _long_lines(s.read(10**9, None))
    assert len(calib) > 5000
    for d in DOMAINS.values():
        lines = _long_lines(d.read(None))
        assert len(lines) > 500, d.name
        shared = lines & calib
        assert not shared, (d.name, sorted(shared)[:5])


def test_the_check_catches_a_leak():
    """The same check on a domain that does read calibration text finds it."""
    leaked = SOURCES["prose"].read(20_000) + "\n" + DOMAINS["docs"].read(None)[:20_000]
    calib = _long_lines(SOURCES["prose"].read(10**9))
    assert _long_lines(leaked) & calib


def test_mix_has_every_source_and_the_paper_size():
    assert mix_counts(128) == {"prose": 53, "code": 25, "chat": 25, "readmes": 25}
    assert mix_counts(5) == {"prose": 2, "code": 1, "chat": 1, "readmes": 1}
    assert sum(mix_counts(2).values()) == 2 and sum(mix_counts(7).values()) == 7


def test_readmes_source_is_markdown_from_several_packages():
    text = SOURCES["readmes"].read(10**9)
    assert text.count("](http") > 20 and "\n# " in text and "|---" in text.replace(" ", "")  # links, headings, tables
    assert sum(f"# {name}" in text.lower() for name in ("filelock", "sympy", "requests")) == 3


def test_readmes_blocks_are_the_installed_descriptions_spread_evenly():
    """Against a plain reading: every listed installed package's description, joined, cut into blocks."""
    import importlib.metadata

    from edge_vlm.quantize.calibration import README_DISTS, calibration_blocks

    texts = []
    for d in README_DISTS:
        try:
            t = (importlib.metadata.metadata(d).get_payload() or "").strip()
        except importlib.metadata.PackageNotFoundError:
            continue
        if len(t) >= 500:
            texts.append(t)
    tokenize = lambda text: [ord(c) for c in text]  # noqa: E731 (one token per character)
    blocks, lines = builtin_blocks(tokenize, 10, 256)
    want = calibration_blocks(tokenize("\n\n".join(texts)), 2, 256, "plain")
    assert lines[-1].startswith("readmes: 2 x 256") and torch.equal(blocks[-2:], want)


def test_a_short_source_gives_its_blocks_to_prose(monkeypatch):
    """The readmes of a slim install may not fill their share: prose takes the rest, n_samples holds."""
    from edge_vlm.quantize import calibration

    short = calibration.CalibrationSource("readmes", "short", (), lambda n, t=None: "x" * 400)
    monkeypatch.setitem(calibration.SOURCES, "readmes", short)
    tokenize = lambda text: list(range(len(text) // 3))  # noqa: E731 (the readmes: 133 tokens)
    assert mix_counts(10)["readmes"] == 2
    blocks, lines = builtin_blocks(tokenize, 10, 128)
    assert blocks.shape == (10, 128)
    assert lines[0].startswith("prose: 5 x 128") and lines[-1].startswith("readmes: 1 x 128")
    blocks, lines = builtin_blocks(tokenize, 10, 512)  # none fits: prose takes both, no readmes line
    assert blocks.shape == (10, 512) and lines[0].startswith("prose: 6 x 512") and len(lines) == 3


def test_builtin_blocks_render_chat_in_the_models_template(smollm2):
    from edge_vlm.text.templates import ChatTemplate
    from edge_vlm.text.tokenizer import Tokenizer

    tok = Tokenizer(smollm2)
    template = ChatTemplate(tok.chat_template, "checkpoint", tok.bos_token, tok.eos_token)
    blocks, lines = builtin_blocks(tok.encode, 4, 256, template)
    assert blocks.shape == (4, 256) and [ln.split(":")[0] for ln in lines] == ["prose", "code", "chat", "readmes"]
    im_start = tok.token_to_id("<|im_start|>")
    has = [bool((b == im_start).any()) for b in blocks]
    assert has == [False, False, True, False]  # only the chat block is in the template
    sets = domain_ids(tok.encode, 1024, template)
    assert all(len(v) == 1024 for v in sets.values()) and im_start in sets["chat"]


# ------------------------------------------------------------------ GPTQ and H-based losses

def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """With a diagonal H nothing can be compensated: GPTQ must give RTN's integers exactly."""
    from edge_vlm.quantize.gptq import gptq_quantize
    from edge_vlm.quantize.groupwise import quantize_weight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=g)
    h = torch.diag(torch.rand(256, generator=g) + 0.1)
    a, b = gptq_quantize(w, h, 64, damp=0.0), quantize_weight(w, 64)
    assert torch.equal(a.q, b.q) and torch.equal(a.zeros, b.zeros) and torch.equal(a.scales, b.scales)


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    from edge_vlm.quantize.gptq import gptq_quantize
    from edge_vlm.quantize.groupwise import quantize_weight

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 32, generator=g) @ torch.randn(32, 256, generator=g)  # low-rank: strongly correlated
    x = x + 0.1 * torch.randn(2048, 256, generator=g)
    w = torch.randn(64, 256, generator=g)
    h = x.t() @ x / x.shape[0]
    err = {n: float((x @ (q.dequantize() - w).t()).pow(2).mean())
           for n, q in (("rtn", quantize_weight(w, 64)), ("gptq", gptq_quantize(w, h, 64)))}
    assert err["gptq"] < 0.5 * err["rtn"], err
    q = gptq_quantize(w, h, 64)
    assert q.q.max() <= 15 and q.scales.dtype == torch.float16 and q.zeros.shape == (64, 4)


def test_gptq_uses_the_group_range_it_is_given():
    """Each group's grid comes from `group_range` on the weights as updated so far: with a diagonal H
    (no compensation) that is the given range of the original weights, group by group."""
    from edge_vlm.quantize.gptq import gptq_quantize
    from edge_vlm.quantize.groupwise import group_grid

    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 192, generator=g)
    seen = []

    def half_range(grp, col):
        seen.append(col)
        return 0.5 * grp.amin(1), 0.5 * grp.amax(1)
    q = gptq_quantize(w, torch.eye(192), 64, damp=0.0, group_range=half_range)
    assert seen == [0, 64, 128]
    for i in range(3):
        wg = w[:, 64 * i:64 * (i + 1)]
        scale, zero = group_grid(0.5 * wg.amin(1), 0.5 * wg.amax(1), 4)
        assert torch.equal(q.scales[:, i].float(), scale) and torch.equal(q.zeros[:, i].float(), zero)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_gptq_on_clipped_grids_with_uncorrelated_inputs_is_the_clipped_rounding(seed):
    """With a diagonal H GPTQ compensates nothing, so on the clipping search's grids it must give
    exactly the clipped round-to-nearest of the AWQ default, and beat min-max grids on heavy tails."""
    from edge_vlm.quantize.awq import AWQOptions, _clipped_range, search_clip_hessian
    from edge_vlm.quantize.gptq import gptq_quantize
    from edge_vlm.quantize.groupwise import quantize_weight

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=g) ** 3
    h = torch.diag(torch.rand(256, generator=g) + 0.1)
    opts = AWQOptions(group_size=64)
    a = gptq_quantize(w, h, 64, damp=0.0, group_range=_clipped_range(h, opts))
    b = quantize_weight(w, 64, 4, *search_clip_hessian(w, h, opts))
    assert torch.equal(a.q, b.q) and torch.equal(a.zeros, b.zeros) and torch.equal(a.scales, b.scales)

    def err(q):
        d = q.dequantize() - w
        return float((d @ h * d).sum())
    assert err(a) < err(gptq_quantize(w, h, 64, damp=0.0))  # no group worse (ratio 1 is a candidate), some better


def test_hessian_loss_equals_the_token_loss():
    """tr(dW H dW^T)/rows with H = X^T X / T is the mean squared output error over those T tokens."""
    from edge_vlm.quantize.awq import AWQOptions, _linear_block, search_scales

    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 128, generator=g) * torch.linspace(0.1, 4, 128)
    ws = [torch.randn(96, 128, generator=g), torch.randn(32, 128, generator=g)]
    opts = AWQOptions(group_size=64, n_grid=5)
    s_tok, best_tok, rtn_tok = search_scales(x, x.abs().mean(0), ws, _linear_block, opts)
    s_h, best_h, rtn_h = search_scales(x, x.abs().mean(0), ws, _linear_block, opts, h=x.t() @ x / 512)
    assert rtn_h == pytest.approx(rtn_tok, rel=1e-3) and best_h == pytest.approx(best_tok, rel=1e-3)
    torch.testing.assert_close(s_h, s_tok)


def test_hessian_clip_search_matches_the_token_search_on_the_same_tokens():
    from edge_vlm.quantize.awq import AWQOptions, search_clip, search_clip_hessian

    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 128, generator=g)
    w = torch.randn(16, 128, generator=g) ** 3  # heavy tails: clipping pays
    opts = AWQOptions(group_size=64, clip_tokens=256)
    lo_t, hi_t = search_clip(w, x, opts)
    lo_h, hi_h = search_clip_hessian(w, x.t() @ x / 256, opts)
    assert (lo_t == lo_h).float().mean() > 0.95 and (hi_t == hi_h).float().mean() > 0.95  # ties aside
    full = search_clip_hessian(w, x.t() @ x / 256, AWQOptions(group_size=64, clip_damp=1e6))
    lo0, hi0 = w.view(16, 2, 64).amin(-1), w.view(16, 2, 64).amax(-1)
    # an overwhelming damp scores the weight error alone: never the more aggressive clips
    assert bool((full[1] >= 0.7 * hi0).all() and (full[0] <= 0.7 * lo0).all())


# ------------------------------------------------------------------ output shards

def test_sharded_output_loads_to_the_same_logits(tmp_path):
    from edge_vlm import load_model
    from edge_vlm.quantize.pipeline import QuantizeSettings, quantize_checkpoint
    from tests.factories import make_llm

    make_llm(tmp_path / "src", "llama", 0, intermediate_size=128, num_hidden_layers=2)
    common = dict(group_size=32, n_samples=4, seqlen=64)
    one = quantize_checkpoint(tmp_path / "src", tmp_path / "one", QuantizeSettings(**common), progress=False)
    many = quantize_checkpoint(tmp_path / "src", tmp_path / "many", QuantizeSettings(max_shard_bytes=60_000,
                                                                                     **common), progress=False)
    assert one.shards == ["model.safetensors"] and not (tmp_path / "one" / "model.safetensors.index.json").exists()
    assert len(many.shards) >= 3 and many.shards[0] == f"model-00001-of-{len(many.shards):05d}.safetensors"
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(many.shards)
    for out in ("one", "many"):  # no resume state left behind
        assert sorted(p.name for p in (tmp_path / out).iterdir() if p.is_dir()) == []
        assert not (tmp_path / out / "progress.json").exists() and not (tmp_path / out / "activations.pt").exists()
    assert "calibration: prose: 1 x 64 tokens" in many.text() and "code: 1 x 64" in many.text()
    assert "readmes: 1 x 64 tokens of published READMEs" in many.text()
    ids = torch.randint(0, 380, (1, 12), generator=torch.Generator().manual_seed(0))
    logits = []
    for out in ("one", "many"):
        llm = load_model(tmp_path / out, device="cpu", progress=False, fast_path=False).llm
        logits.append(llm(llm.embed(ids), llm.new_cache(12), all_logits=True))
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
