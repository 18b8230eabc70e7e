"""Which backend runs the language model: "auto" (the CLI's default) takes llama.cpp on the CPU
when llama-cpp-python is installed, keeps torch without it or on a GPU, and falls back to torch
with one warning where llama.cpp cannot take the checkpoint; an explicit "llama.cpp" raises."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from edge_vlm import ChatSession, GenerationConfig, load_model
from edge_vlm.backends.llamacpp.choice import LlamaCppFallbackWarning, resolve_llm_backend
from edge_vlm.cli import main
from edge_vlm.errors import EdgeVLMError
from edge_vlm.contracts import Prompt
from tests.factories import make_rtn_int4

GREEDY = GenerationConfig(max_new_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.factories import make_llm

    folder = tmp_path_factory.mktemp("choice") / "llama"
    make_llm(folder, "llama", seed=5)
    return folder


@pytest.fixture(scope="module")
def awq_group16(tiny, tmp_path_factory):
    """An AWQ-layout checkpoint whose groups of 16 do not split into llama.cpp's Q4_1 blocks of 32."""
    return make_rtn_int4(tiny, tmp_path_factory.mktemp("choice") / "awq16", group_size=16)


def test_resolution_rules(monkeypatch):
    assert resolve_llm_backend("auto", "cpu") == "llama.cpp"  # llama-cpp-python is in the test extra
    assert resolve_llm_backend("auto", "cuda") == "torch"
    assert resolve_llm_backend("auto", "meta") == "torch"
    assert resolve_llm_backend("torch", "cpu") == "torch"
    assert resolve_llm_backend("llama.cpp", "cuda") == "llama.cpp"
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if it were not installed
    assert resolve_llm_backend("auto", "cpu") == "torch"


def test_auto_runs_llama_cpp_on_the_cpu_and_agrees_with_torch(tiny):
    fast = load_model(tiny, device="cpu", progress=False, llm_backend="auto")
    ref = load_model(tiny, device="cpu", progress=False, llm_backend="torch", fast_path=False)
    assert fast.info.llm_backend == "llama.cpp" and fast.gguf_path.is_file()
    ids = ref.tokenizer.encode("hello there, how are you")
    got, want = fast.new_engine().prefill(Prompt([ids])), ref.new_engine().prefill(Prompt([ids]))
    # the 16-bit checkpoint runs as a Q8_0 export with 8-bit activations in llama.cpp's dot
    # products (~0.5% relative error each): the logits agree in direction, not bit for bit
    cos = torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=0)
    assert cos > 0.999
    session = ChatSession(fast)
    session.answer("hello there", gen=GREEDY)
    assert session.stats.backend == "llama.cpp" and session.stats.new_tokens > 0


def test_auto_without_llama_cpp_is_torch_and_silent(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_model(tiny, device="cpu", progress=False, llm_backend="auto")
    assert model.info.llm_backend == "torch" and model.gguf_path is None


def test_auto_falls_back_to_torch_with_one_warning(awq_group16):
    with pytest.warns(LlamaCppFallbackWarning, match="blocks of 32") as seen:
        model = load_model(awq_group16, device="cpu", progress=False, llm_backend="auto")
    assert len(seen) == 1
    assert model.info.llm_backend == "torch" and model.info.quantization.startswith("awq")
    assert ChatSession(model).answer("hi", gen=GREEDY) is not None
    with pytest.raises(EdgeVLMError, match="blocks of 32"):
        load_model(awq_group16, device="cpu", progress=False, llm_backend="llama.cpp")


def test_cli_default_is_auto(tiny, capsys):
    assert main(["info", str(tiny)]) == 0
    assert "LLM backend:   llama.cpp (auto, llama-cpp-python installed)" in capsys.readouterr().out
    args = ["chat", "--model", str(tiny), "--temperature", "0", "--max-new-tokens", "3", "hi"]
    assert main(args) == 0
    assert "LLM on llama.cpp" in capsys.readouterr().err
    assert main(args + ["--backend", "torch"]) == 0
    assert "LLM on torch" in capsys.readouterr().err


@pytest.mark.parametrize("forced,dtype", [("1", torch.bfloat16), ("0", torch.float32)])
def test_vision_side_keeps_its_cpu_choice_when_llama_cpp_runs_the_llm(tiny_vila, monkeypatch, forced, dtype):
    """The LLM is llama.cpp's (a shape-only module here), yet the vision tower still gets the CPU's
    bf16-or-fp32 choice the torch backend gives it (forced here: the timing depends on the CPU)."""
    from edge_vlm.backends.cpu import timing

    timing.cpu_bf16_matmul_is_faster.cache_clear()
    monkeypatch.setenv("EDGE_VLM_CPU_BF16", forced)
    try:
        model = load_model(tiny_vila, device="cpu", progress=False, llm_backend="llama.cpp")
    finally:
        timing.cpu_bf16_matmul_is_faster.cache_clear()
    assert model.info.llm_backend == "llama.cpp"
    assert next(model.vision.parameters()).dtype == dtype and next(model.projector.parameters()).dtype == dtype
    session = ChatSession(model)
    from PIL import Image

    session.answer("what is this?", images=[Image.new("RGB", (40, 30), (200, 30, 60))], gen=GREEDY)
    assert session.stats.new_tokens > 0
