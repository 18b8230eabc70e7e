"""Function calling through the server: OpenAI `tools` / `tool_choice` in, `message.tool_calls`
(streamed as `delta.tool_calls`) out, `role: "tool"` results back in, Nemovision's `context`.

Two halves:
- the real `edge-vlm serve` with the real SmolLM2 under the nemovision template (its tool format),
  driven by the real openai client: a named tool_choice forces a call (a grammar around the
  function's schema; the arguments are checked with jsonschema), few-shot "auto" makes the model
  write a call of its own, and every bad request is a 400 naming its field;
- the app in this process over tiny random models, whose engine is scripted (`Scripted`) so the
  model writes text and then a call: what is streamed as content, and every token the model is fed
  for tool results and context (the card's format), KV prefix reuse included.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from edge_vlm import load_model
from tests.apps.test_server_support import Scripted, Server, in_process

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
COUNT = {"type": "function", "function": {
    "name": "count_objects", "description": "Count objects of a kind in the camera picture",
    "parameters": {"type": "object", "properties": {"kind": {"type": "string", "enum": ["person", "car", "dog"]},
                                                    "at_least": {"type": "integer", "minimum": 0, "maximum": 9}},
                   "required": ["kind", "at_least"], "additionalProperties": False}}}
TOOLS = [WEATHER, COUNT]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def server(smollm2):
    s = Server(smollm2, "--max-context", "1024", "--template", "nemovision", backend="auto").wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def post(server, body):
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=300)


def calls_of(calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def accumulate(chunks) -> tuple[str, list[dict], str | None]:
    """(content, tool calls, finish reason) of raw chat.completion.chunk dicts, accumulated by
    index as OpenAI's clients do; checks each call's first delta carries id, type and name."""
    content, calls, finish = "", {}, None
    for c in chunks:
        for choice in c.get("choices", []):
            delta = choice["delta"]
            content += delta.get("content") or ""
            for d in delta.get("tool_calls") or []:
                if d["index"] not in calls:
                    assert d["id"] and d["type"] == "function" and d["function"]["name"], d
                    calls[d["index"]] = {"id": d["id"], "name": d["function"]["name"], "arguments": ""}
                calls[d["index"]]["arguments"] += d["function"].get("arguments") or ""
            finish = choice["finish_reason"] or finish
    return content, [calls[i] for i in sorted(calls)], finish


def sse(response) -> list[dict]:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


# ---- the real server, the real SmolLM2, the real openai client --------------------------------

def test_round_trip_with_the_openai_client_non_streamed_and_streamed(client):
    """tools in, tool_calls out, the result back as role tool, then a text answer; the second
    request reuses the cached first turn. The same with streaming (the client's stream helper
    accumulates our deltas) gives the same calls."""
    question = [{"role": "user", "content": "What is the weather in Paris? Use the tools."}]
    r = client.chat.completions.create(model="nvidia/vila", messages=question, tools=TOOLS, tool_choice=NAMED,
                                       max_tokens=40, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (name, args), = calls_of(choice.message.tool_calls)
    assert name == "get_weather" and choice.message.tool_calls[0].id.startswith("call_")
    jsonschema.validate(args, SCHEMAS[name])
    messages = question + [choice.message, {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id,
                                            "content": json.dumps({"temp": 21, "unit": args["unit"], "sky": "clear"})}]
    final = client.chat.completions.create(model="nvidia/vila", messages=messages, tools=TOOLS, tool_choice="none",
                                           max_tokens=8, temperature=0)
    assert final.choices[0].message.tool_calls is None and final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content and "<toolcall>" not in final.choices[0].message.content
    assert final.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens  # the first turn was reused

    with client.chat.completions.stream(model="nvidia/vila", messages=question, tools=TOOLS, tool_choice=NAMED,
                                        max_tokens=40, temperature=0) as stream:
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls" and not streamed.message.content
    assert calls_of(streamed.message.tool_calls) == [(name, args)]
    messages = question + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
        for c in streamed.message.tool_calls]}, messages[-1] | {"tool_call_id": streamed.message.tool_calls[0].id}]
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="nvidia/vila", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0,
        stream=True) if c.choices)
    assert text == final.choices[0].message.content


def test_named_choice_forces_valid_arguments_and_streams_the_same_calls(server, client):
    """Sampled at temperature 1 with a seed: the forced call validates against its function's
    schema, and the stream's deltas accumulate to the call the non-streamed answer gave."""
    for seed, fn in [(1, "count_objects")]:
        body = {"messages": [{"role": "user", "content": "A dog and two people walk past in the rain."}],
                "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": fn}},
                "max_tokens": 40, "temperature": 1.0, "seed": seed}
        r = client.chat.completions.create(model="nvidia/vila", **body)
        (name, args), = calls_of(r.choices[0].message.tool_calls)
        assert name == fn
        jsonschema.validate(args, SCHEMAS[fn])
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body | {"stream": True},
                          timeout=300) as s:
            content, calls, finish = accumulate(sse(s))
        assert content == "" and finish == "tool_calls"
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [(name, args)]


def test_auto_parses_the_call_the_model_writes_and_no_markup_is_streamed(server, client):
    """tool_choice auto (the default): SmolLM2, shown one call in the conversation, writes its own
    for the next city; it is parsed out of the text, streamed or not."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
                {"role": "assistant", "content": "It is 21 C and sunny in Paris."},
                {"role": "user", "content": "What is the weather in Rome?"}]
    r = client.chat.completions.create(model="nvidia/vila", messages=messages, tools=TOOLS, max_tokens=40,
                                       temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (name, args), = calls_of(choice.message.tool_calls)
    assert name == "get_weather" and args["city"] == "Rome"
    assert not choice.message.content
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=300,
                      json={"messages": messages, "tools": TOOLS, "max_tokens": 40, "temperature": 0,
                            "stream": True}) as s:
        chunks = sse(s)
    content, calls, finish = accumulate(chunks)
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [(name, args)]
    # "none" shows the same tools (the same prompt) but no call can begin: the model writes text
    r = client.chat.completions.create(model="nvidia/vila", messages=messages, tools=TOOLS, tool_choice="none",
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    assert r.choices[0].message.content and "<toolcall>" not in r.choices[0].message.content  # (it may try "<toolcall_2>")


GOOD_CALL = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0"),
    ({"tools": [{"name": "bare_function"}]}, "tools.0"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools.1"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "send_email"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "nvext": {"guided_json": {"type": "object"}}}, "nvext"),
    ({"tools": TOOLS, "parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": GOOD_CALL},
                   {"role": "tool", "content": "r"}]}, "messages.2.tool_call_id"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]},
                   {"role": "tool", "tool_call_id": "c", "content": "r"}]}, "messages.1.tool_calls.0.function.arguments"),
    ({"messages": [{"role": "user", "content": "q", "tool_calls": GOOD_CALL}]}, "messages.0.tool_calls"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
])
def test_bad_tool_requests_are_400s_naming_the_field(server, extra, param):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0, **extra}
    r = post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and "Traceback" not in err["message"], err
    good = post(server, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0})
    assert good.status_code == 200, good.text  # and the server goes on


# ---- in this process: a scripted tiny model, every token it is fed ----------------------------

CALL_TEXT = '<toolcall> {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}} </toolcall>'


@pytest.fixture(scope="module")
def nemo(tiny_llava):
    """The app over the tiny Nemotron LLaVA (nemovision template), its engine scripted."""
    from starlette.testclient import TestClient

    app, worker = in_process(load_model(tiny_llava, device="cpu", progress=False))
    with TestClient(app) as http:
        yield http, worker, Scripted(worker.session.engine)
    worker.close()


def test_auto_streams_the_text_before_a_call_never_its_markup(nemo):
    http, worker, rec = nemo
    tok = worker.model.tokenizer
    eos = tok.token_to_id("</s>")
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER], "max_tokens": 120,
            "temperature": 0}
    rec.script = tok.encode("Let me check.\n" + CALL_TEXT) + [eos]
    r = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert r["finish_reason"] == "tool_calls" and r["message"]["content"] == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in r["message"]["tool_calls"]] == [
        ("get_weather", {"city": "Paris", "unit": "C"})]
    rec.script = tok.encode("Let me check.\n" + CALL_TEXT) + [eos]
    with http.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as s:
        chunks = sse(s)
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    assert not any("<" in p or "{" in p for p in pieces), pieces  # not even a partial tag
    content, calls, finish = accumulate(chunks)
    assert content == "Let me check." and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Paris", "unit": "C"})]
    # a block that is no call (bad JSON) stays text, streamed or not: nothing half-parsed is a call
    bad = 'Hm <toolcall> {"name": } </toolcall>'
    rec.script = tok.encode(bad) + [eos]
    r = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["message"]["content"] == bad and "tool_calls" not in r["message"]
    rec.script = tok.encode(bad) + [eos]
    with http.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as s:
        assert accumulate(sse(s)) == (bad, [], "stop")


def test_required_and_named_choices_force_one_valid_call_from_a_random_model(nemo):
    """The grammar alone makes the tiny random model call: "required" one of the tools, a named
    choice that function, every time with arguments valid for its schema."""
    http, worker, rec = nemo
    rec.script = []
    schemas = {"count": {"type": "object", "properties": {"kind": {"enum": ["car", "dog"]},
                                                          "n": {"type": "integer", "minimum": 0, "maximum": 9}},
                         "required": ["kind", "n"], "additionalProperties": False},
               "flag": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"],
                        "additionalProperties": False}}  # small: the tiny tokenizer's prompt must fit 512 tokens
    bare = [{"type": "function", "function": {"name": n, "parameters": p}} for n, p in schemas.items()]
    for seed in range(4):
        for choice, names in [("required", set(schemas)), ({"type": "function", "function": {"name": "count"}},
                                                           {"count"})]:
            body = {"messages": [{"role": "user", "content": f"Look {seed}"}], "tools": bare, "tool_choice": choice,
                    "max_tokens": 120, "temperature": 1.0, "seed": seed}
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            r = r.json()["choices"][0]
            assert r["finish_reason"] == "tool_calls" and r["message"]["content"] is None, r
            (call,) = r["message"]["tool_calls"]
            assert call["function"]["name"] in names
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])


def test_tool_results_and_context_are_fed_in_the_card_format_reusing_the_cache(nemo):
    http, worker, rec = nemo
    tok = worker.model.tokenizer
    eos = tok.token_to_id("</s>")
    question = [{"role": "system", "content": "You help travellers."}, {"role": "user", "content": "Weather?"}]
    body = {"messages": question, "tools": [WEATHER], "context": ["Paris is in France."], "max_tokens": 120,
            "temperature": 0}
    rec.script, rec.fed = tok.encode(CALL_TEXT) + [eos], []
    r = http.post("/v1/chat/completions", json=body).json()
    message = r["choices"][0]["message"]
    assert tok.decode(rec.fed, skip_special=False) == (
        "<extra_id_0>System\nYou help travellers.\n\n<tool> " + json.dumps(WEATHER) + " </tool>\n"
        "<context> Paris is in France. </context>\n\n<extra_id_1>User\nWeather?\n<extra_id_1>Assistant\n" + CALL_TEXT)
    first_turn = len(rec.fed)
    rec.script, rec.fed = [eos], []
    back = question + [message, {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "21 C"}]
    r = http.post("/v1/chat/completions", json=body | {"messages": back, "tool_choice": "none"}).json()
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == first_turn  # only the Tool turn ran
    assert tok.decode(rec.fed, skip_special=False) == "\n<extra_id_1>Tool\n21 C\n<extra_id_1>Assistant\n"
    assert r["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in r["choices"][0]["message"]


def test_models_without_a_tool_format_or_a_context_block_refuse_by_field(tiny_vila):
    from starlette.testclient import TestClient

    app, worker = in_process(load_model(tiny_vila, device="cpu", progress=False))  # vicuna_v1: neither
    try:
        with TestClient(app) as http:
            ask = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
            for extra, param, words in [({"tools": [WEATHER]}, "tools", "cannot take tools"),
                                        ({"tools": [WEATHER], "tool_choice": "none"}, "tools", "cannot take tools"),
                                        ({"context": "a document"}, "context", "no place for context"),
                                        ({"messages": [{"role": "user", "content": "q"},
                                                       {"role": "assistant", "content": None, "tool_calls": GOOD_CALL},
                                                       {"role": "tool", "tool_call_id": "call_1", "content": "r"}]},
                                         "messages", "cannot take tools")]:
                r = http.post("/v1/chat/completions", json=ask | extra)
                assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
                assert words in r.json()["error"]["message"]
                assert http.post("/v1/chat/completions", json=ask).status_code == 200
    finally:
        worker.close()
