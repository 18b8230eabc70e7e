"""`--device cuda` correct by construction, checked on a CPU: no tensor of the layer quantizer is made on
the default device (on a GPU run that is the CPU, and mixing the two fails), and the fp16 layer a GPU run
quantizes goes through the same steps as the float32 one (the searches upcast to float32)."""

from __future__ import annotations

import copy

import pytest
import torch

from edge_vlm.quantize.awq import AWQOptions, LayerRunner, quantize_layer_awq
from tests.quantize.test_quantize_fast_paths import _tiny_layer


@pytest.mark.parametrize("kind", ["llama", "nemotron"])
def test_layer_quantizer_makes_every_tensor_on_its_inputs_device(kind):
    """With the default device set to `meta`, any factory call without an explicit device makes a meta
    tensor, and mixing it with the CPU data raises: exactly how a forgotten device= fails on CUDA."""
    cfg, layer, x = _tiny_layer(kind)
    opts = AWQOptions(group_size=64)
    plain, plain_out = quantize_layer_awq(copy.deepcopy(layer), cfg, x, LayerRunner(cfg, 64, "cpu"), opts)
    runner = LayerRunner(cfg, 64, x.device)  # the runtime's rope tables: built on the CPU, then moved (legit)
    with torch.device("meta"):
        result, out = quantize_layer_awq(copy.deepcopy(layer), cfg, x, runner, opts)
    assert out.device.type == "cpu" and torch.equal(out, plain_out)
    assert all(torch.equal(result.weights[n].q, plain.weights[n].q) for n in plain.weights)


def test_fp16_layer_as_a_gpu_run_holds_it_quantizes_like_float32():
    """On CUDA the pipeline loads the layer and the calibration states in fp16. Every search and GPTQ
    upcast to float32, so only the fp16 forward passes differ (2^-11 relative): codes agree almost
    everywhere and the layer loss moves by a few percent at most."""
    cfg, layer, x = _tiny_layer()
    opts = AWQOptions(group_size=64)
    runner = LayerRunner(cfg, 64, "cpu")
    full, _ = quantize_layer_awq(copy.deepcopy(layer), cfg, x, runner, opts)
    half, out = quantize_layer_awq(copy.deepcopy(layer).half(), cfg, x.half(), runner, opts)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert all(half.weights[n].scales.dtype == torch.float16 for n in half.weights)
    agree = torch.cat([(half.weights[n].q == full.weights[n].q).flatten() for n in full.weights]).float().mean()
    assert agree > 0.95, agree
    assert half.loss == pytest.approx(full.loss, rel=0.1)
