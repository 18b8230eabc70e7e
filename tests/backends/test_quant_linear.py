"""WQLinear (the plain-torch int4 reference layer) and prepare_quantized (the loader's hook)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from edge_vlm.formats.configs import QuantConfig
from edge_vlm.errors import UnsupportedModelError
from edge_vlm.formats.int4_formats import pack_gemm
from edge_vlm.models.quant_linear import WQLinear, prepare_quantized


def _random_wq(k=128, n=48, group=64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=g)
    z = torch.randint(0, 16, (k // group, n), generator=g)
    s = (torch.rand(k // group, n, generator=g) * 0.05 + 0.005).half()
    layer = WQLinear(k, n, group, 4, bias=bias, dtype=torch.float32)
    t = pack_gemm(q, z, s)
    layer.qweight.copy_(t["qweight"])
    layer.qzeros.copy_(t["qzeros"])
    layer.scales.copy_(t["scales"].float())
    if bias:
        layer.bias.copy_(torch.randn(n, generator=g))
    w = torch.stack([(q[i] - z[i // group]).float() * s[i // group].float() for i in range(k)])  # [K, N]
    return layer, w


def test_forward_equals_dense_matmul_on_random_inputs():
    layer, w = _random_wq()
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(9))
    # fp32 both ways with identical weights: differences are summation order only (~1e-6 relative)
    torch.testing.assert_close(layer(x), x @ w + layer.bias, rtol=1e-5, atol=1e-5)


def test_state_dict_has_autoawq_names_shapes_and_dtypes():
    layer, _ = _random_wq(k=128, n=48, group=64)
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "qzeros", "scales", "bias"}
    assert sd["qweight"].shape == (128, 6) and sd["qweight"].dtype == torch.int32
    assert sd["qzeros"].shape == (2, 6) and sd["qzeros"].dtype == torch.int32
    assert sd["scales"].shape == (2, 48)
    assert (layer.in_features, layer.out_features, layer.group_size, layer.w_bit) == (128, 48, 64, 4)
    assert "bias" not in WQLinear(128, 48, 64).state_dict()


def test_shapes_that_cannot_hold_the_layout_are_refused():
    with pytest.raises(UnsupportedModelError, match="multiple of the group size"):
        WQLinear(576, 64, 128)
    with pytest.raises(UnsupportedModelError, match="4-bit"):
        WQLinear(128, 64, 128, w_bit=3)


def test_prepare_quantized_swaps_decoder_linears_but_not_lm_head():
    from edge_vlm.formats.configs import LLMConfig
    from edge_vlm.models.llm import DecoderLM
    from tests.factories import llm_config

    cfg = LLMConfig.from_hf(llm_config("qwen2").to_dict())
    with torch.device("meta"):
        llm = DecoderLM(cfg)
    names = prepare_quantized(llm, QuantConfig.from_hf({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                    "version": "gemm", "modules_to_not_convert": ["mlp.down_proj"]}))
    assert len(names) == cfg.num_layers * 6  # q,k,v,o,gate,up; down kept by modules_to_not_convert
    layer = llm.layers[0]
    assert isinstance(layer.self_attn.q_proj, WQLinear) and layer.self_attn.q_proj.bias is not None  # Qwen2 bias
    assert isinstance(layer.mlp.down_proj, nn.Linear) and isinstance(llm.lm_head, nn.Linear)
    assert "layers.0.self_attn.q_proj.qweight" in llm.state_dict()


@pytest.mark.parametrize("bad,match", [({"quant_method": "gptq"}, "gptq"), ({"version": "gemv"}, "gemv"),
                                       ({"zero_point": False}, "zero points")])
def test_unsupported_quantization_configs_are_one_line_errors(bad, match):
    from edge_vlm.formats.configs import LLMConfig
    from edge_vlm.models.llm import DecoderLM
    from tests.factories import llm_config

    with torch.device("meta"):
        llm = DecoderLM(LLMConfig.from_hf(llm_config("llama").to_dict()))
    with pytest.raises(UnsupportedModelError, match=match):
        prepare_quantized(llm, QuantConfig.from_hf({"quant_method": "awq", "group_size": 32, **bad}))
