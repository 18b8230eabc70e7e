"""Structured answers through the server: OpenAI's `response_format` (json_object, json_schema) and
NIM's `nvext.guided_json` / `guided_choice` constrain the real SmolLM2's answer (checked with
jsonschema), streamed and not; bad specs are 400s that name the field, and the server keeps serving."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.apps.test_server_support import Server

pytestmark = pytest.mark.slow

EVENT = {"type": "object", "properties": {
    "label": {"type": "string", "enum": ["person", "car", "dog", "none"]},
    "count": {"type": "integer", "minimum": 0, "maximum": 20},
    "note": {"type": "string", "maxLength": 40}},
    "required": ["label", "count", "note"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(smollm2):
    s = Server(smollm2, "--max-context", "1024", backend="auto").wait_ready()
    yield s
    s.stop()


def post(server, body):
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)


def ask(text: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 80, "temperature": 0, **extra}


def test_response_format_json_schema_with_the_openai_client_streamed_and_not(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    fmt = {"type": "json_schema", "json_schema": {"name": "event", "schema": EVENT}}
    messages = [{"role": "user", "content": "A dog runs across the road. Report it."}]
    r = client.chat.completions.create(model="nvidia/vila", messages=messages, response_format=fmt,
                                       max_tokens=80, temperature=0)
    jsonschema.validate(json.loads(r.choices[0].message.content), EVENT)
    assert r.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="nvidia/vila", messages=messages, response_format=fmt,
                                            max_tokens=80, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content
    sampled = client.chat.completions.create(model="nvidia/vila", messages=messages, response_format=fmt,
                                             max_tokens=80, temperature=1.0, seed=3)
    jsonschema.validate(json.loads(sampled.choices[0].message.content), EVENT)


def test_nim_guided_json_and_guided_choice(server):
    r = post(server, ask("Two cars are parked. Report them.", nvext={"guided_json": EVENT}))
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), EVENT)
    r = post(server, ask("Is the sky blue?", nvext={"guided_choice": ["yes", "no"]}))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] in ("yes", "no")
    r = post(server, ask("Describe a cat.", response_format={"type": "json_object"}, max_tokens=60))
    body = r.json()["choices"][0]
    if body["finish_reason"] == "stop":  # json_object bounds nothing: it completes, or says it was cut
        assert isinstance(json.loads(body["message"]["content"]), dict)
    else:
        assert body["finish_reason"] == "length"
    r = post(server, ask("Hi", response_format={"type": "text"}, max_tokens=3))  # text: no constraint
    assert r.status_code == 200


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "nvext": {"guided_json": EVENT}}, "guided_json"),
    ({"nvext": {"guided_regex": "a+"}}, "nvext.guided_regex"),
    ({"nvext": {"guided_choice": "yes"}}, "nvext.guided_choice"),
])
def test_bad_structured_specs_are_400s_naming_the_field(server, extra, param):
    r = post(server, ask("Hi", **extra))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "Traceback" not in err["message"]
    assert post(server, ask("Hi", max_tokens=2)).status_code == 200  # and the server goes on
