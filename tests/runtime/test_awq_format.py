"""AWQ weight layouts: the AutoAWQ GEMM packing and NVIDIA's TinyChat (llm-awq v2) packing.

Each layout is checked against a reference packer written here from the layout's definition,
element by element (a different formulation from the code under test), on random integers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edge_vlm.formats.tinychat import TinyChatStore
from edge_vlm.formats.int4_formats import (AWQ_ORDER, dequantize_gemm, pack_gemm, pack_nibbles, tinychat_scale_rows,
                                   tinychat_to_gemm, unpack_nibbles, unpack_tinychat_qweight)
from tests.awq_reference import awq_pack, awq_unpack


def tinychat_position(k: int) -> int:
    """Where input column k of a row lands in TinyChat's column order (two shuffles per 32 columns)."""
    block, w = divmod(k, 32)
    a, rest = divmod(w, 8)
    b, c = divmod(rest, 2)
    u = b * 8 + a * 2 + c  # first shuffle: 8-runs and pairs swap roles
    d, rem = divmod(u, 8)
    e, c2 = divmod(rem, 2)
    return block * 32 + d * 8 + c2 * 4 + e  # second shuffle: 0,2,4,6,1,3,5,7 within each 8


def reference_tinychat_pack(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] (ints 0..15, row = output feature) -> TinyChat int16 [N/4, K], element by element.

    Four consecutive output rows share each int16 (row n % 4 in nibble ...); within a block of
    64 permuted columns, the 4x64 values of the four rows are laid out row-major and read back
    four at a time.
    """
    n, k = q.shape
    pos = torch.tensor([tinychat_position(col) for col in range(k)])  # [K]
    row = torch.arange(n)[:, None]
    i, r = row // 4, row % 4                                          # int16 row, nibble row
    j, c = pos[None, :] // 64, pos[None, :] % 64                      # 64-column block, place in it
    f = r * 64 + c                                                    # row-major in the 4x64 block
    target = (i * k + j * 64 + f // 4).expand(n, k)
    values = q.long() << (4 * (f % 4))
    words = torch.zeros(n // 4 * k, dtype=torch.int64).scatter_add_(0, target.reshape(-1), values.reshape(-1))
    words = words.view(n // 4, k)  # the four nibbles of a word come from four rows: disjoint bits, + is |
    return torch.where(words >= 1 << 15, words - (1 << 16), words).to(torch.int16)


def test_gemm_packing_matches_reference_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (6, 32), generator=g)
    packed = pack_nibbles(values, AWQ_ORDER)
    assert packed.dtype == torch.int32 and packed.shape == (6, 4)
    assert torch.equal(packed, awq_pack(values))
    assert torch.equal(unpack_nibbles(packed, AWQ_ORDER).long(), values)


def test_gemm_dequantize_is_q_minus_zero_times_scale():
    g = torch.Generator().manual_seed(1)
    k, n, gs = 64, 16, 32
    q = torch.randint(0, 16, (k, n), generator=g)
    z = torch.randint(0, 16, (k // gs, n), generator=g)
    s = torch.rand(k // gs, n, generator=g).half() + 0.01
    t = pack_gemm(q, z, s)
    assert t["qweight"].shape == (k, n // 8) and t["qzeros"].shape == (k // gs, n // 8)
    w = dequantize_gemm(t["qweight"], t["qzeros"], t["scales"].float(), gs)
    expected = torch.stack([(q[i] - z[i // gs]).float() * s[i // gs].float() for i in range(k)])
    assert torch.equal(w, expected)


def _tinychat_tensors(q_nk: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int):
    """TinyChat buffers for one layer from integers q [N, K], zeros/scales [N, K/G]."""
    n, k = q_nk.shape
    rows = tinychat_scale_rows(k, group)
    s_pad = torch.zeros(rows, n, dtype=torch.float16)
    s_pad[: k // group] = scales.t().half()
    sz = torch.zeros(rows, n, dtype=torch.float16)
    sz[: k // group] = -(scales.t().float() * zeros.t().float()).half()
    return reference_tinychat_pack(q_nk), s_pad, sz


@pytest.mark.parametrize("n,k", [(8, 64), (12, 128)])
def test_tinychat_unpacking_inverts_reference_packer(n, k):
    g = torch.Generator().manual_seed(n + k)
    q = torch.randint(0, 16, (n, k), generator=g)
    packed = reference_tinychat_pack(q)
    assert packed.dtype == torch.int16 and packed.shape == (n // 4, k)
    assert torch.equal(unpack_tinychat_qweight(packed, n, k).long(), q)


def test_tinychat_to_gemm_keeps_the_same_weights():
    g = torch.Generator().manual_seed(3)
    n, k, group = 16, 128, 64
    q = torch.randint(0, 16, (n, k), generator=g)
    zeros = torch.randint(0, 16, (n, k // group), generator=g)
    scales = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).half()
    qweight, s_pad, sz = _tinychat_tensors(q, zeros, scales, group)
    assert s_pad.shape[0] == 16  # K/G = 2 groups padded to 8, times 2 for group 64
    gemm = tinychat_to_gemm(qweight, s_pad, sz, group)
    w = dequantize_gemm(gemm["qweight"], gemm["qzeros"], gemm["scales"].float(), group)  # [K, N]
    # TinyChat's own definition: w = q * s + scaled_zero
    ref = q.float() * scales.float().repeat_interleave(group, 1) + sz[: k // group].float().t().repeat_interleave(group, 1)
    # the integers and zero points come back exactly; the only difference is TinyChat's fp16 rounding of
    # -s*z, at most half an fp16 ulp (2^-11 relative) of the largest |s*z|
    assert torch.equal(awq_unpack(gemm["qweight"]).t(), q)
    assert torch.equal(awq_unpack(gemm["qzeros"]).t(), zeros)
    torch.testing.assert_close(w.t(), ref, atol=2**-11 * float(sz.float().abs().max()), rtol=0)


def _tiny_llm_for_tinychat(folder: Path):
    from tests.factories import make_llm

    # K of every linear a multiple of 64 (TinyChat's column block) and of the group size
    return make_llm(folder, "llama", seed=5, hidden_size=64, intermediate_size=128)


def test_vila_with_tinychat_llm_loads_and_matches_dequantized_reference(tmp_path):
    """A VILA folder whose llm/ holds only a TinyChat `.pt` (the published VILA AWQ layout)."""
    from edge_vlm import load_model
    from edge_vlm.models.quant_linear import WQLinear
    from edge_vlm.quantize.groupwise import quantize_weight
    from tests.factories import make_vila

    group = 32
    _tiny_llm_for_tinychat(tmp_path / "src-llm")
    make_vila(tmp_path / "vila", llm_folder=tmp_path / "src-llm")
    llm_dir = tmp_path / "vila" / "llm"
    from safetensors.torch import load_file

    state = load_file(str(llm_dir / "model.safetensors"))
    packed, dequant = {}, {}
    for key, w in state.items():
        if ".layers." in key and key.endswith("_proj.weight"):
            qw = quantize_weight(w.float(), group)
            base = key[: -len(".weight")]
            packed[base + ".qweight"], packed[base + ".scales"], packed[base + ".scaled_zeros"] = \
                _tinychat_tensors(qw.q.long(), qw.zeros.long(), qw.scales, group)
            dequant[key] = qw.dequantize(torch.float32)
        else:
            packed[key] = w
    (llm_dir / "model.safetensors").unlink()
    torch.save(packed, llm_dir / "tiny-w4-g32-awq-v2.pt")

    model = load_model(tmp_path / "vila", device="cpu", progress=False, fast_path=False)
    assert model.info.quantization == "awq w4 g32"
    assert isinstance(model.llm.layers[0].mlp.down_proj, WQLinear)
    assert (tmp_path / "vila" / "vision_tower").is_dir() and model.vision is not None

    ref_llm = _dense_reference(tmp_path / "src-llm", dequant)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    cache_a, cache_b = model.llm.new_cache(16), ref_llm.new_cache(16)
    got = model.llm(model.llm.embed(ids), cache_a, all_logits=True)
    want = ref_llm(ref_llm.embed(ids), cache_b, all_logits=True)
    # fp32 on both sides, same dequantized values: only summation order differs
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _dense_reference(llm_folder: Path, dequant: dict[str, torch.Tensor]):
    from edge_vlm import load_model

    llm = load_model(llm_folder, device="cpu", progress=False).llm
    with torch.no_grad():
        for key, w in dequant.items():
            llm.get_parameter(key[len("model."):]).copy_(w)
    return llm


def test_tinychat_store_infers_group_size_from_shapes(tmp_path):
    g = torch.Generator().manual_seed(4)
    n, k, group = 8, 128, 64
    q = torch.randint(0, 16, (n, k), generator=g)
    zeros = torch.randint(0, 16, (n, k // group), generator=g)
    scales = (torch.rand(n, k // group, generator=g) + 0.1).half()
    qweight, s_pad, sz = _tinychat_tensors(q, zeros, scales, group)
    torch.save({"model.layers.0.mlp.up_proj.qweight": qweight, "model.layers.0.mlp.up_proj.scales": s_pad,
                "model.layers.0.mlp.up_proj.scaled_zeros": sz, "model.norm.weight": torch.ones(4)},
               tmp_path / "weights.pt")  # no "g64" in the name: the shapes decide
    store = TinyChatStore(tmp_path / "weights.pt")
    assert store.group_size == 64
    assert sorted(store.keys()) == sorted(["model.layers.0.mlp.up_proj.qweight", "model.layers.0.mlp.up_proj.qzeros",
                                           "model.layers.0.mlp.up_proj.scales", "model.norm.weight"])
    for key in store.keys():
        assert tuple(store.meta(key).shape) == tuple(store.get(key).shape)
    assert torch.equal(awq_unpack(store.get("model.layers.0.mlp.up_proj.qzeros")), zeros.t())


def test_truncated_tinychat_file_is_one_line_error(tmp_path):
    from edge_vlm.errors import CheckpointError

    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        TinyChatStore(tmp_path / "bad.pt")
