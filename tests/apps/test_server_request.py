"""A request becomes a GenerationConfig in one place, `ChatRequest.to_generation_config`: every
field maps, the server's defaults stay where the request is silent, and a value GenerationConfig
refuses is a 400 naming the request's own field (in process: the method itself, then the app)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from apps.server.errors import APIError
from apps.server.protocol import ChatRequest
from edge_vlm.text.constrained import Constraint
from edge_vlm.text.sampling import GenerationConfig

MSG = [{"role": "user", "content": "Hi"}]
DEFAULTS = GenerationConfig(max_new_tokens=77, temperature=0.3, top_p=0.8, top_k=5, repetition_penalty=1.2, seed=9,
                            stop=["END"])
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def config(**fields) -> GenerationConfig:
    request = ChatRequest(messages=MSG, **fields)
    return request.to_generation_config(DEFAULTS, request.tool_plan("hermes"))


def refusal(**fields) -> APIError:
    with pytest.raises(APIError) as e:
        config(**fields)
    assert e.value.status == 400 and e.value.code == "invalid_value"
    assert e.value.message.startswith(f"{e.value.param}: ")
    return e.value


def test_a_silent_request_keeps_every_default():
    gen = config()
    assert gen == DEFAULTS and gen.stop is not DEFAULTS.stop  # equal, but the defaults' list is not shared


def test_each_field_maps():
    gen = config(max_tokens=5, temperature=0.0, top_p=0.5, top_k=3, repetition_penalty=1.5, seed=-1, stop="\n")
    assert gen == GenerationConfig(max_new_tokens=5, temperature=0.0, top_p=0.5, top_k=3, repetition_penalty=1.5,
                                   seed=-1, stop=["\n"])
    assert config(stop=["a", "b"]).stop == ["a", "b"]
    assert config(stop=[]).stop == []  # an explicit empty list is "no stops", not "the defaults"
    assert config(seed=0).seed == 0 and config(top_k=0).top_k == 0  # a given 0 is not "not given"


def test_max_completion_tokens_wins_over_max_tokens():
    assert config(max_completion_tokens=4).max_new_tokens == 4
    assert config(max_tokens=6, max_completion_tokens=4).max_new_tokens == 4
    assert config(max_tokens=6).max_new_tokens == 6


def test_the_constraint_comes_from_response_format_nvext_or_the_tool_plan():
    assert config(response_format={"type": "json_object"}).constraint == Constraint.parse({"type": "json_object"})
    assert config(response_format={"type": "text"}).constraint is None
    assert config(nvext={"guided_choice": ["yes", "no"]}).constraint == Constraint.parse(["yes", "no"])
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert config(nvext={"guided_json": schema}).constraint == Constraint.parse(schema)
    assert config(tools=[WEATHER]).constraint is None  # auto: the model decides, its calls are parsed after
    forced = config(tools=[WEATHER], tool_choice="required").constraint
    assert forced == Constraint.tool_calls("hermes", [WEATHER]) and forced.kind == "tool_call"
    named = config(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "weather"}}).constraint
    assert named == forced
    assert config(tools=[WEATHER], tool_choice="none").constraint.kind != "tool_call"


@pytest.mark.parametrize("fields,param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"temperature": 2.5}, "temperature"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"), ({"seed": 2**63}, "seed"),
    ({"seed": -2**63 - 1}, "seed"), ({"stop": ""}, "stop"), ({"stop": ["a", ""]}, "stop"),
    ({"stop": [str(i) for i in range(17)]}, "stop"),
], ids=lambda v: repr(v)[:40])
def test_a_value_generation_config_refuses_is_a_400_naming_the_request_field(fields, param):
    e = refusal(**fields)
    assert e.param == param, e.message


def test_a_bad_constraint_names_its_field():
    assert refusal(response_format={"type": "json_schema", "json_schema": {"schema": 5}}).param == "response_format"
    with pytest.raises(APIError) as e:
        config(nvext={"guided_choice": "yes"})
    assert e.value.param == "nvext.guided_choice"


@pytest.mark.parametrize("body,param,words", [
    ({"max_tokens": 0}, "max_tokens", "at least 1"), ({"temperature": 3}, "temperature", "0 (greedy) to 2"),
    ({"top_p": 0}, "top_p", "above 0"), ({"seed": 2**64}, "seed", "2**63"),
    ({"repetition_penalty": -1}, "repetition_penalty", "above 0"), ({"stop": [""]}, "stop", "non-empty"),
    ({"max_tokens": True}, "max_tokens", "integer"),  # shapes stay pydantic's
    ({"frequency_penalty": 5}, "frequency_penalty", "only 0"),
])
def test_the_app_answers_them_as_openai_errors_and_goes_on(served, body, param, words):
    app, _ = served()
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/chat/completions", json={"messages": MSG, **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] == param and err["message"].startswith(f"{param}: ") and words in err["message"], err
        ok = c.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200, ok.text


def test_the_server_defaults_reach_the_answer(served):
    """The request says nothing of length: the server's default max_new_tokens bounds the answer."""
    app, _ = served(gen_defaults=GenerationConfig(max_new_tokens=3, temperature=0))
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json={"messages": MSG})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
