"""`edge-vlm bench` and the kernel benchmark run end to end on CPU (tiny shape: this checks the
harness, not speed), and the random-int4 model builder produces a working AWQ model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from edge_vlm.benchmarks.random_model import build_llm, random_awq_linear
from edge_vlm.benchmarks.shapes import linear_shapes, llm_config


def test_random_awq_linear_is_a_valid_awq_layer():
    from tests.awq_reference import awq_unpack

    layer = random_awq_linear(256, 64, "cpu", torch.float32, seed=1)
    groups = torch.arange(256) // layer.group_size
    w = (awq_unpack(layer.qweight) - awq_unpack(layer.qzeros)[groups]) * layer.scales.double()[groups]
    x = torch.randn(3, 256)
    assert torch.allclose(layer(x).double(), x.double() @ w, rtol=1e-4, atol=1e-5)
    assert w.std() > 0  # random, not zeros


def test_int4_random_model_runs_through_the_cpu_fast_path():
    from edge_vlm.backends import optimize_for_device

    llm = build_llm(llm_config("tiny"), "cpu", torch.float32, int4=True)
    assert optimize_for_device(llm).counts == {"cpu_int4_linear": 14}
    cache = llm.new_cache(16)
    with torch.inference_mode():
        logits = llm(llm.embed(torch.tensor([[3, 4, 5]])), cache)
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_linear_shapes_of_the_real_models():
    assert ("gate+up", 2560, 2 * 6912) in linear_shapes("vila1.5-3b")
    assert ("k/v_proj", 3072, 8 * 128) in linear_shapes("nemotron-mini-4b")
    assert ("lm_head", 4096, 128256) in linear_shapes("llama-3-8b")


def test_bench_command_writes_table_and_plot(tmp_path, capsys):
    from edge_vlm.cli import main

    rc = main(["bench", "--device", "cpu", "--model-shape", "tiny", "--layers", "2", "--contexts", "16,32",
               "--decode-steps", "2", "--repeats", "1", "--max-context", "64", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| float32 eager |" in out and "| ours int4 |" in out and "decode tok/s @32" in out
    assert "Ours on this CPU: int4 matmul with " in out  # the choices the numbers depend on
    png = tmp_path / "tiny-cpu.png"
    assert Image.open(png).size == (1000, 420)
    assert "ours int4" in (tmp_path / "tiny-cpu.md").read_text()


def test_bench_llama_cpp_variant(tmp_path, capsys):
    """`--llama-cpp`: the same int4 weights exported as Q4_1-AWQ and timed in llama.cpp, in the same
    table, with the exported tokenizer's vocabulary for every row."""
    from edge_vlm.cli import main

    rc = main(["bench", "--device", "cpu", "--model-shape", "tiny", "--layers", "2", "--contexts", "16",
               "--decode-steps", "2", "--repeats", "1", "--max-context", "64", "--out", str(tmp_path), "--llama-cpp"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| ours int4 |" in out and "| ours int4 on llama.cpp |" in out
    assert "Decode speed-up, ours int4 on llama.cpp vs float32 eager" in out
    row = next(line for line in out.splitlines() if line.startswith("| ours int4 on llama.cpp |"))
    assert float(row.split("|")[4]) > 0  # a decode speed was measured


def test_bench_on_a_missing_gpu_is_a_one_line_error(capsys):
    import pytest

    from edge_vlm.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "--device", "cuda", "--model-shape", "tiny"]) == 1
    assert capsys.readouterr().err.strip() == "edge-vlm: error: --device cuda asked for, but this torch sees no CUDA GPU"


@pytest.mark.parametrize("tied", [False, True])
def test_decode_bytes_counts_what_a_step_reads(tied):
    from edge_vlm.benchmarks.bench_e2e import decode_bytes
    from edge_vlm.vlm import weight_bytes
    from edge_vlm.formats.configs import LLMConfig
    from edge_vlm.models.llm import DecoderLM
    from tests.factories import llm_config as hf_config

    llm = DecoderLM(LLMConfig.from_hf(hf_config("llama", tie_word_embeddings=tied).to_dict()))
    llm.tie_weights()
    table = llm.embed_tokens.weight
    assert (llm.lm_head.weight is table) == tied
    if tied:  # the table is the lm_head: read whole every step
        assert decode_bytes(llm, 0, 4) == weight_bytes(llm)
    else:  # one embedding row, not the table
        assert decode_bytes(llm, 0, 4) == weight_bytes(llm) - table.nbytes + table[0].nbytes
    cfg = llm.cfg
    assert decode_bytes(llm, 10, 4) - decode_bytes(llm, 0, 4) == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 10 * 4


def test_big_vocabulary_settings_build_what_quantize_writes(tmp_path, capsys):
    from edge_vlm.vlm import weight_bytes
    from edge_vlm.cli import main
    from edge_vlm.backends import optimize_for_device
    from edge_vlm.models.quant_linear import Int8Embedding, WQLinear

    cfg = llm_config("tiny")
    plain = build_llm(cfg, "cpu", torch.float32, int4=True)
    small = build_llm(cfg, "cpu", torch.float32, int4=True, int4_lm_head=True, int8_embedding=True)
    assert isinstance(small.lm_head, WQLinear) and isinstance(small.embed_tokens, Int8Embedding)
    table = plain.embed_tokens.weight.nbytes + plain.lm_head.weight.nbytes
    assert weight_bytes(plain) - weight_bytes(small) > 0.6 * table  # int8 + int4 instead of two fp32 tables
    assert optimize_for_device(small).counts == {"cpu_int4_linear": 14 + 1}  # the lm_head too
    with torch.inference_mode():
        logits = small(small.embed(torch.tensor([[3, 4, 5]])), small.new_cache(8))
    assert torch.isfinite(logits).all() and logits.std() > 0

    rc = main(["bench", "--device", "cpu", "--model-shape", "tiny", "--layers", "2", "--contexts", "16",
               "--decode-steps", "2", "--repeats", "1", "--max-context", "32", "--out", str(tmp_path),
               "--quantize-lm-head", "--quantize-embedding", "--kv-cache", "int8"])
    out = capsys.readouterr().out
    assert rc == 0 and "Ours with int4 lm_head and int8 embeddings and an int8 KV cache." in out
    # the memory figure counts the int8 cache: (D + 4) bytes a vector against 4 D for fp32
    from edge_vlm.benchmarks.bench_e2e import run as run_e2e

    ours = {kv: run_e2e("tiny", "cpu", (16,), 2, 2, None, None, 512, 1, variants=("int4",), progress=lambda m: None,
                        kv_int8=kv)[0][0] for kv in (False, True)}
    d = cfg.head_dim
    saved = 2 * cfg.num_layers * cfg.num_kv_heads * 512 * (4 * d - (d + 4))
    assert ours[False].peak_bytes - ours[True].peak_bytes == saved


def test_attention_benchmark_harness_runs():
    """The decode-attention table (ours vs SDPA): on CPU ours runs through the interpreter, so
    this checks the harness and that both sides got the same shapes, not speed."""
    from edge_vlm.benchmarks.bench_kernels import bench_attention, format_attention

    rows = bench_attention(["tiny"], torch.device("cpu"), contexts=(8, 24), reps=1)
    assert [r["ctx"] for r in rows] == [8, 24] and all(r["ours_us"] > 0 and r["sdpa_us"] > 0 for r in rows)
    assert rows[1]["kv_mb"] == 3 * rows[0]["kv_mb"]
    assert "| tiny | 24 |" in format_attention(rows, "cpu")


def test_vision_dtype_benchmark_runs(capsys):
    import re

    from edge_vlm.benchmarks.vision_dtype import main

    main(["--model-shape", "tiny", "--repeats", "1"])
    out = capsys.readouterr().out
    rel = float(re.search(r"\| bfloat16 \| \d+ \| ([\d.]+) \|", out).group(1))
    assert 0 < rel < 2**-4  # bf16 rounding of a 2-layer tower: small but not zero


def test_vision_shapes_give_the_image_token_counts_the_bench_prefills():
    from edge_vlm.benchmarks.random_model import build_vision
    from edge_vlm.benchmarks.shapes import IMAGE_TOKENS, vision_config

    clip = vision_config("nemotron-mini-4b", layers=1)  # Nemovision: CLIP ViT-L/14-336, CLS dropped
    tower = build_vision(clip, "cpu", torch.float32)
    with torch.inference_mode():
        feats = tower(torch.randn(1, 3, 336, 336))
    assert feats.shape == (1, IMAGE_TOKENS["nemotron-mini-4b"], 1024)  # mlp2x_gelu keeps every patch
    siglip = vision_config("vila1.5-3b")
    side = siglip.image_size // siglip.patch_size  # 27
    assert IMAGE_TOKENS["vila1.5-3b"] == ((side + 1) // 2) ** 2  # mlp_downsample merges 2x2 (padded) patches
