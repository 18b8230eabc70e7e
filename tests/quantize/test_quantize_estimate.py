"""`edge-vlm quantize` on a tiny model: the matmul precision it picks (and the forced fallback), the
time estimates it prints, the `--fast` preset, and the operation counts the estimates come from."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch

import edge_vlm.quantize.matmul_choice as matmul_choice
import edge_vlm.quantize.pipeline as pipeline
from edge_vlm.quantize.matmul_choice import MatmulRates
from edge_vlm.quantize.pipeline import FAST, QuantizeSettings, quantize_checkpoint

TINY = dict(group_size=32, n_samples=4, seqlen=64)
AMX = MatmulRates(fp32=300, bf16=1500, fp64=150, elementwise=8)
AVX2 = MatmulRates(fp32=150, bf16=40, fp64=75, elementwise=4)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from tests.factories import make_llm

    folder = tmp_path_factory.mktemp("est") / "src"
    make_llm(folder, "llama", 3, intermediate_size=128, num_hidden_layers=2)
    return folder


def _rates(monkeypatch, rates: MatmulRates) -> None:
    monkeypatch.setattr(matmul_choice, "measure_rates", lambda width, device, reps=3: rates)


def _logits(folder) -> torch.Tensor:
    from edge_vlm import load_model

    llm = load_model(folder, device="cpu", progress=False, fast_path=False).llm
    ids = torch.arange(40).view(1, 40) % 300
    return llm(llm.embed(ids), llm.new_cache(40), all_logits=True)


def test_quantize_names_its_matmul_and_prints_estimates_before_and_after_the_first_layer(src, tmp_path, monkeypatch):
    _rates(monkeypatch, AVX2)
    lines = []
    summary = quantize_checkpoint(src, tmp_path / "out", QuantizeSettings(**TINY), progress=False, log=lines.append)
    text = "\n".join(lines)
    assert "matmul: fp32 (measured here: 40 GFLOP/s bf16, 150 float32)" in text  # the fallback, forced
    estimate = next(line for line in lines if line.startswith("estimate: ~"))
    assert "for 2 layers (fp32 products" in estimate
    assert any(line.startswith("layer 0 took ") and line.endswith("for the other 1 layers") for line in lines)
    assert lines.index(estimate) < next(i for i, line in enumerate(lines) if line.startswith("layer 0 took"))
    assert summary.matmul == "fp32" and len(summary.layer_seconds) == 2
    assert "time per layer: first" in summary.text() and "(fp32 products)" in summary.text()


def test_bf16_where_measured_faster_and_its_checkpoint_matches_the_float32_one(src, tmp_path, monkeypatch):
    _rates(monkeypatch, AMX)
    lines = []
    bf16 = quantize_checkpoint(src, tmp_path / "bf16", QuantizeSettings(**TINY), progress=False, log=lines.append)
    assert bf16.matmul == "bf16" and any(line.startswith("matmul: bf16") for line in lines)
    assert quantize_checkpoint(src, tmp_path / "fp32", QuantizeSettings(matmul="fp32", **TINY), progress=False).matmul == "fp32"
    ref = _logits(src)
    err = {name: float((_logits(tmp_path / name) - ref).pow(2).mean() / ref.pow(2).mean()) for name in ("bf16", "fp32")}
    # bf16 moved one layer's held-out error by ~1% (test_quantize_fast_paths); on this 2-layer random model,
    # calibrated on 256 tokens, the whole model's logits error (6% here) may move more, never by a new model's
    assert err["bf16"] < 1.3 * err["fp32"], err


def test_a_resumed_run_keeps_the_precision_it_started_with(src, tmp_path, monkeypatch):
    from tests.quantize.test_quantize_pipeline import dies_on_layer_1

    real = pipeline.quantize_layer_awq
    _rates(monkeypatch, AMX)
    monkeypatch.setattr(pipeline, "quantize_layer_awq", dies_on_layer_1(real))
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, tmp_path / "out", QuantizeSettings(**TINY), progress=False, log=lambda m: None)
    monkeypatch.setattr(pipeline, "quantize_layer_awq", real)
    _rates(monkeypatch, AVX2)  # the machine now measures otherwise: auto alone would switch to fp32
    lines = []
    summary = quantize_checkpoint(src, tmp_path / "out", QuantizeSettings(**TINY), resume=True, progress=False,
                                  log=lines.append)
    assert summary.matmul == "bf16"
    assert any(line.startswith("matmul: bf16 (kept from the run resumed)") for line in lines)


def _cli_settings(monkeypatch, argv) -> QuantizeSettings:
    from edge_vlm.quantize import cli

    seen = {}

    class Stop(Exception):
        pass

    def fake(src, out, settings, **kw):
        seen["settings"] = settings
        raise Stop

    monkeypatch.setattr(pipeline, "quantize_checkpoint", fake)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["quantize", "SRC", "OUT", *argv])
    with pytest.raises(Stop):
        args.func(args)
    return seen["settings"]


def test_cli_fast_preset_and_matmul_flag(monkeypatch):
    default = _cli_settings(monkeypatch, [])
    assert (default.n_samples, default.n_grid, default.search_tokens, default.matmul) == (128, 20, 4096, "auto")
    fast = _cli_settings(monkeypatch, ["--fast", "--matmul", "fp32"])
    assert {k: getattr(fast, k) for k in FAST} == FAST and fast.matmul == "fp32"
    assert FAST["n_samples"] < 128 and FAST["n_grid"] < 20 and FAST["search_tokens"] < 4096
    assert _cli_settings(monkeypatch, ["--fast", "--n-samples", "8"]).n_samples == 8  # explicit wins


def test_bad_matmul_setting_is_a_one_line_error(src, tmp_path):
    with pytest.raises(pipeline.QuantizeError, match="unknown matmul precision 'fp8'"):
        quantize_checkpoint(src, tmp_path / "out", QuantizeSettings(matmul="fp8", **TINY), progress=False)
    assert not (tmp_path / "out.partial").exists()


def test_counted_flops_are_those_the_layer_runs():
    """cost.layer_steps against torch's own flop counter on a real layer quantization. The counter does not
    see in-place products (H's addmm_, GPTQ's addr_/addmm_) nor CPU flash attention: those are counted by
    our formulas alone and left out of the comparison; everything else must agree exactly."""
    from torch.utils.flop_counter import FlopCounterMode

    from edge_vlm.formats.configs import LLMConfig
    from edge_vlm.models.llm import DecoderLayer
    from edge_vlm.quantize.awq import AWQOptions, LayerRunner, quantize_layer_awq
    from edge_vlm.quantize.cost import layer_steps

    cfg = LLMConfig(arch="llama", vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=4,
                    num_kv_heads=2, head_dim=32, norm_eps=1e-5, max_position_embeddings=64)
    torch.manual_seed(0)
    layer = DecoderLayer(cfg)
    x = torch.randn(6, 64, 128)
    opts = AWQOptions(group_size=64, search_tokens=128)
    with FlopCounterMode(display=False) as counter:
        quantize_layer_awq(copy.deepcopy(layer), cfg, x, LayerRunner(cfg, 64, "cpu"), opts)
    steps = {s.name: s for s in layer_steps(cfg, 6, 64, opts)}
    attention = 2 * 384 * 64 * 4 * 32  # QK^T and AV over 384 tokens of 64-token sequences, 4 heads of 32, causal half
    seen = sum(s.amount for s in steps.values() if s.kind in ("forward", "search", "fp32")) \
        - steps["H = X^T X"].amount - steps["GPTQ: column sweep"].amount - 2 * attention
    assert counter.get_total_flops() == pytest.approx(seen, rel=1e-9)
