"""`--threads N` (chat, serve, camera): the CPU threads llama.cpp runs the language model on,
for prompt batches and single tokens alike, read back from the llama.cpp context itself."""

from __future__ import annotations

import argparse

import pytest

from edge_vlm import load_model
from edge_vlm.backends.llamacpp.batched import batched_context
from edge_vlm.backends.llamacpp.engine import default_threads
from edge_vlm.cli import options

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGE_VLM_CACHE", str(tmp_path_factory.mktemp("edge-vlm-cache")))
    yield
    mp.undo()


def threads_of(llama) -> tuple[int, int]:
    lib = llama.lib
    return int(lib.llama_n_threads(llama.ctx)), int(lib.llama_n_threads_batch(llama.ctx))


def test_llm_threads_reach_the_context_of_each_engine(tiny_vila, cache):
    model = load_model(tiny_vila, device="cpu", progress=False, llm_backend="llama.cpp", llm_threads=1)
    assert model.gguf_path is not None
    assert threads_of(model.new_engine(64)._llama) == (1, 1)
    batched = batched_context(model, 2, 64)
    assert threads_of(batched._llama) == (1, 1)


def test_default_is_every_core_we_may_use(tiny_vila, cache):
    model = load_model(tiny_vila, device="cpu", progress=False, llm_backend="llama.cpp")
    assert threads_of(model.new_engine(64)._llama) == (default_threads(),) * 2


def test_threads_option_parses_and_is_passed_to_load_model(monkeypatch):
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    options.add_model_options(p)
    seen = {}
    monkeypatch.setattr(options, "load_model", lambda *a, **k: seen.update(k))
    options.load_from_args(p.parse_args(["--model", "m", "--threads", "3"]))
    assert seen["llm_threads"] == 3
    options.load_from_args(p.parse_args(["--model", "m"]))
    assert seen["llm_threads"] is None
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit):
            p.parse_args(["--threads", bad])


def test_bad_thread_count_in_the_api_is_one_clear_error(tiny_vila):
    from edge_vlm.errors import EdgeVLMError

    with pytest.raises(EdgeVLMError, match="at least 1"):
        load_model(tiny_vila, device="cpu", progress=False, llm_backend="llama.cpp", llm_threads=0)
