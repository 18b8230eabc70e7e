"""Every implementation of a runtime role provides its contract (edge_vlm/contracts.py): each member,
as a property where the contract has one, with methods that take the contract's parameters by the
same names in the same order. `runtime_checkable` alone checks only that the names exist."""

from __future__ import annotations

import inspect

import pytest
import torch

from edge_vlm.backends.llamacpp.batched import SlotEngine
from edge_vlm.backends.llamacpp.engine import LlamaCppEngine
from edge_vlm.backends.onnx.encoder import OnnxVisionEncoder
from edge_vlm.backends.torch_engine import TorchEngine
from edge_vlm.backends.triton.cuda_graph import CUDAGraphEngine
from edge_vlm.cli.doctor import stand_in_llm
from edge_vlm.apps.camera.remote import RemoteSession
from edge_vlm.apps.server.image_cache import CachedImages
from edge_vlm.contracts import ChatFormatter, Engine, GenerationStats, ImageEncoder, Prompt, Session
from edge_vlm.session import ChatSession
from edge_vlm.text.templates import ChatTemplate


def _members(proto) -> dict[str, object]:
    """The contract's members: methods and properties as declared, data attributes from annotations."""
    found = {name: value for name, value in vars(proto).items()
             if not name.startswith("_") and (callable(value) or isinstance(value, property))}
    found.update({name: "attribute" for name in getattr(proto, "__annotations__", {}) if name not in found})
    call = vars(proto).get("__call__")
    if call is not None:
        found["__call__"] = call
    return found


def _parameters(fn) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in list(inspect.signature(fn).parameters.values())[1:]]


def breaches(cls: type, proto) -> list[str]:
    """What `cls` lacks of `proto`, one line each (empty: it provides the contract)."""
    out = []
    for name, wanted in _members(proto).items():
        have = inspect.getattr_static(cls, name, None)
        if have is None:
            if wanted == "attribute" and name in inspect.signature(cls.__init__).parameters:
                continue  # set from the constructor's argument of that name
            out.append(f"{cls.__name__} has no {name}")
        elif isinstance(wanted, property) and not isinstance(have, property):
            out.append(f"{cls.__name__}.{name} is not a property")
        elif callable(wanted) and not isinstance(wanted, property):
            if not callable(have):
                out.append(f"{cls.__name__}.{name} is not a method")
                continue
            need = _parameters(wanted)
            got = _parameters(have)
            if got[:len(need)] != need or any(p.default is inspect.Parameter.empty for p in
                                              list(inspect.signature(have).parameters.values())[1 + len(need):]
                                              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)):
                out.append(f"{cls.__name__}.{name}{inspect.signature(have)} does not take {need}")
    return out


@pytest.mark.parametrize("cls", [TorchEngine, CUDAGraphEngine, LlamaCppEngine, SlotEngine])
def test_every_engine_provides_the_engine_contract(cls):
    assert breaches(cls, Engine) == []


@pytest.mark.parametrize("cls", [OnnxVisionEncoder, CachedImages])
def test_every_image_encoder_provides_the_encoder_contract(cls):
    assert breaches(cls, ImageEncoder) == []


@pytest.mark.parametrize("cls", [ChatSession, RemoteSession])
def test_every_session_provides_the_session_contract(cls):
    assert breaches(cls, Session) == []


def test_a_remote_session_is_a_session_with_the_servers_stats():
    remote = RemoteSession("http://127.0.0.1:9", system="Be brief.")
    try:
        assert isinstance(remote, Session) and isinstance(remote.stats, GenerationStats)
        remote.reset()
        assert remote.system == "Be brief."  # KEEP, the default, keeps it
        remote.reset(system=None)
        assert remote.system is None
    finally:
        remote.close()


def test_a_remote_session_answers_and_counts_as_the_local_session_does(model, served):
    """The same greedy question through the server: the same text, and the server's usage and
    timings as the stats (the whole prompt, the answer's tokens, why it ended)."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from edge_vlm import GenerationConfig

    app, _ = served()
    picture = Image.new("RGB", (64, 48), (30, 120, 200))
    gen = GenerationConfig(max_new_tokens=5, temperature=0)
    local = ChatSession(model, system="Be brief.")
    want = "".join(local.ask("What is this?", images=[picture], gen=gen))
    with TestClient(app) as http:
        remote = RemoteSession("http://testserver", system="Be brief.", http=http)
        got = "".join(remote.ask("What is this?", images=[picture], gen=gen))
    s, r = local.stats, remote.stats
    assert got == want
    assert r.prompt_tokens + r.cached_prompt_tokens == s.prompt_tokens + s.cached_prompt_tokens > 0
    assert (r.new_tokens, r.stop_reason) == (s.new_tokens, s.stop_reason) and r.ttft_s > 0 and r.vision_s > 0


def test_the_image_cache_encodes_each_picture_once_and_hands_back_what_the_encoder_gave():
    from PIL import Image

    calls = []

    def encode(images):
        calls.append(len(images))
        return torch.stack([torch.full((2, 3), float(im.getpixel((0, 0))[0])) for im in images])

    cache = CachedImages(encode, per_picture_blocks=False, capacity=2)
    assert isinstance(cache, ImageEncoder)
    red, blue = Image.new("RGB", (4, 4), (200, 0, 0)), Image.new("RGB", (4, 4), (7, 0, 255))
    first = cache([red, blue])
    again = cache([Image.new("RGB", (4, 4), (200, 0, 0)), blue])  # equal pixels, another object: a hit
    assert calls == [2] and torch.equal(first, again) and (cache.hits, cache.misses) == (2, 2)
    cache([Image.new("RGB", (4, 4), (1, 1, 1))])  # a third picture: the oldest (red) leaves
    cache([red])
    assert calls == [2, 1, 1] and len(cache) == 2


def test_the_chat_template_provides_the_formatter_contract():
    assert breaches(ChatTemplate, ChatFormatter) == []
    assert isinstance(ChatTemplate.builtin("chatml"), ChatFormatter)


def test_the_checker_finds_a_missing_method_a_renamed_parameter_and_a_plain_attribute():
    class Broken:
        name = "broken"
        position = 0  # a plain attribute where the contract has a property

        @property
        def device(self):
            return torch.device("cpu")

        @property
        def max_context(self):
            return 8

        def prefill(self, tokens):  # the contract calls it `prompt`
            return torch.zeros(4)

        def step(self, token_id, extra):  # an extra parameter without a default
            return torch.zeros(4)

        def reset(self):
            pass

    found = breaches(Broken, Engine)
    assert any("no rewind" in line for line in found)
    assert any("position is not a property" in line for line in found)
    assert any("prefill" in line for line in found)
    assert any("step" in line for line in found)
    assert len(found) == 4


def test_a_torch_engine_is_an_engine_and_runs_a_prompt():
    llm = stand_in_llm("llama", torch.device("cpu"), torch.float32)
    engine = TorchEngine(llm, 16)
    assert isinstance(engine, Engine)
    logits = engine.prefill(Prompt(chunks=[[1, 2, 3]]))
    assert logits.shape == (llm.cfg.vocab_size,) and engine.position == 3
    engine.rewind(1)
    assert engine.position == 1


def test_a_prompt_counts_and_orders_its_pieces():
    images = torch.zeros(2, 3, 4)
    prompt = Prompt(chunks=[[1], [], [2, 3]], images=images)
    assert len(prompt) == 1 + 2 + 6
    pieces = list(prompt.pieces())
    assert [type(p) for p in pieces] == [list, torch.Tensor, torch.Tensor, list]
