"""`edge-vlm info` on an int4 (AWQ GEMM) folder: parameters counted as the weights they stand for
(8 per packed int32), and a memory line that predicts what the chosen backend and device hold,
part by part, checked against what really is held: the tensors of the GGUF the first llama.cpp run
exports, the tower as a CPU load holds it, the KV cache an engine really allocates."""

from __future__ import annotations

import argparse

import pytest
import torch

from edge_vlm import load_model
from edge_vlm.cli import main
from edge_vlm.cli.info import memory_plan
from edge_vlm.cli.memory_plan import parameter_count
from edge_vlm.loading import default_dtype
from edge_vlm.vlm import weight_bytes
from tests.factories import make_rtn_int4

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def int4_vila(tiny_vila, tmp_path_factory):
    return make_rtn_int4(tiny_vila, tmp_path_factory.mktemp("info") / "vila-rtn", group_size=32)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_VLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def plan_of(folder, device="cpu", backend="auto", ctx=4096, kv="model", vision_int8=False) -> dict[str, int]:
    """The parts `edge-vlm info` prints, in bytes."""
    args = argparse.Namespace(backend=backend, max_context=ctx, kv_cache=kv, vision_int8=vision_int8)
    model = load_model(folder, device="meta", dtype=default_dtype(device), max_context=ctx, progress=False,
                       kv_cache=kv, vision_int8=vision_int8)
    return memory_plan(model, args, device).named()


def info(capsys, *args) -> str:
    assert main(["info", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_int4_parameters_count_as_the_weights_they_pack(tiny_vila, int4_vila, capsys):
    fp = load_model(tiny_vila, device="meta", progress=False)
    q = load_model(int4_vila, device="meta", progress=False)
    assert any(m.__class__.__name__ == "WQLinear" for m in q.llm.modules())
    assert parameter_count(q.llm) == parameter_count(fp.llm) == sum(p.numel() for p in fp.llm.parameters())
    out = info(capsys, int4_vila)
    assert f"{parameter_count(fp.llm) / 1e6:.1f}M params" in out.split("vision:")[0], out


def test_llamacpp_cpu_memory_names_the_gguf_tower_and_kv_cache(int4_vila, cache, capsys):
    ctx = 1024
    out = info(capsys, int4_vila, "--device", "cpu", "--backend", "llama.cpp", "--max-context", ctx)
    line = next(l for l in out.splitlines() if l.startswith("memory ("))
    for name in ("memory (llama.cpp on cpu): GGUF q4_1-awq", "vision tower ", "projector ",
                 f"KV cache F16 at {ctx} tokens"):
        assert name in line, line
    got = plan_of(int4_vila, "cpu", "llama.cpp", ctx)
    model = load_model(int4_vila, device="cpu", progress=False, llm_backend="llama.cpp")
    tensors = sum(int(t.n_bytes) for t in gguf.GGUFReader(model.gguf_path).tensors)
    assert got["GGUF q4_1-awq"] == tensors  # the file the first run really exported
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16"}[next(model.vision.parameters()).dtype]  # as this CPU runs it
    assert got[f"vision tower {dtype}"] == weight_bytes(model.vision)
    assert got[f"projector {dtype}"] == weight_bytes(model.projector)
    cfg = model.llm.cfg
    assert got[f"KV cache F16 at {ctx} tokens"] == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * ctx * 2
    int8 = plan_of(int4_vila, "cpu", "llama.cpp", ctx, kv="int8")
    assert int8[f"KV cache Q8_0 at {ctx} tokens"] == got[f"KV cache F16 at {ctx} tokens"] * 34 // 64
    # auto on a CPU with llama-cpp-python: the same plan
    assert plan_of(int4_vila, "cpu", "auto", ctx) == got


def test_torch_cpu_memory_is_what_the_loaded_model_and_its_engine_hold(int4_vila, capsys):
    ctx = 2048
    out = info(capsys, int4_vila, "--device", "cpu", "--backend", "torch", "--max-context", ctx)
    assert "memory (torch on cpu): LLM weights fp32" in out and f"KV cache fp32 at {ctx} tokens" in out, out
    got = plan_of(int4_vila, "cpu", "torch", ctx)
    model = load_model(int4_vila, device="cpu", progress=False, max_context=ctx)  # as chat loads it
    engine = model.new_engine(ctx)
    assert engine.cache.k.dtype == torch.float32
    assert got[f"KV cache fp32 at {ctx} tokens"] == sum(t.numel() * t.element_size()
                                                        for t in (engine.cache.k, engine.cache.v))
    # the CPU int4 kernel repacks the AWQ weights (still 4 bits each; scales and zeros in its own layout)
    assert got["LLM weights fp32"] == pytest.approx(weight_bytes(model.llm), rel=0.02)
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16"}[next(model.vision.parameters()).dtype]
    assert got[f"vision tower {dtype}"] == weight_bytes(model.vision)
