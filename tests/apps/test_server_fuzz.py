"""Fuzzing the request schemas (hypothesis): OpenAI and NIM bodies built from the real fields with
values of every shape (wrong types, out of range, NaN, huge numbers, lone surrogates, control
tokens, media URLs of every scheme, hostile schemas) go to the in-process app over a tiny VILA
model. Every body gets a 200 or a JSON 4xx in OpenAI's error shape, never a 500 or an exception
out of the app (Starlette's TestClient re-raises those), and a normal request answers afterwards.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apps.server.media import MediaLimits
from edge_vlm import GenerationConfig, load_model
from tests.apps.test_server_support import in_process, png_uri

PNG = png_uri(np.full((12, 12, 3), 100, np.uint8))
TOKENS = ["<|im_end|>", "<|im_start|>", "</s>", "<s>", "<extra_id_1>", "<image>", "\ue000ANSWER\ue001", "\ue0020\ue003",
          "<toolcall>", "\x00"]

text = st.one_of(
    st.text(st.characters(codec=None, categories=None), max_size=24),  # surrogates included
    st.sampled_from(TOKENS).map(lambda t: "A" + t + "B"),
    st.just(""),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), text)
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(text, inner, max_size=3)), max_leaves=8)
urls = st.one_of(
    st.just(PNG), st.just(PNG.replace("image/png", "text/html")), st.just("data:image/png;base64,@@@"),
    st.just("data:image/png," + "x"), st.just("data:video/mp4;base64," + base64.b64encode(b"nope").decode()),
    st.just("http://127.0.0.1:9/cat.png"), st.just("https://user:pw@example.com/a.png"),
    st.just("file:///etc/passwd"), st.just("file:///tmp/a%00b"), st.just("ftp://x/y"), text)
part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": text}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
        {"url": urls}, optional={"detail": st.one_of(st.sampled_from(["auto", "low", "high"]), junk)})}),
    st.fixed_dictionaries({"type": st.just("video_url"), "video_url": st.fixed_dictionaries({"url": urls})}),
    junk)
content = st.one_of(text, st.lists(part, max_size=3), st.none(),
                    st.builds(lambda u, t: f'{t} <img src="{u}" />', urls, text), junk)
call = st.fixed_dictionaries({"id": text, "type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": text, "arguments": st.one_of(st.just("{}"), text)})})
message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), junk)},
    optional={"content": content, "tool_calls": st.lists(call, max_size=2), "tool_call_id": text, "name": text})
schema = st.one_of(
    st.just({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
    st.just({"$ref": "#"}), st.integers(1, 300).map(lambda n: json.loads('{"items":' * n + "{}" + "}" * n)),
    st.dictionaries(text, junk, max_size=3))
tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": text}, optional={"description": text, "parameters": schema})})
# Each field: values a client may well send, and hostile ones. A body is a valid request with some
# fields set to good values and, most of the time, one field (or the messages) set to a bad one,
# so both the answering path and every refusal are reached.
clean_text = st.one_of(st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=16),
                       st.sampled_from(TOKENS).map(lambda t: "A" + t + "B"))
FIELDS = {  # name: (good values, bad values)
    "model": (st.sampled_from(["tiny", "nvidia/vila"]), junk),
    "max_tokens": (st.integers(1, 4), junk), "max_completion_tokens": (st.integers(1, 4), junk),
    "temperature": (st.one_of(st.floats(0, 2), st.sampled_from([1e-300, 1e-45, 5e-324])), junk),
    "top_p": (st.floats(0.01, 1), junk), "top_k": (st.integers(0, 50), junk),
    "seed": (st.integers(-2**63, 2**63 - 1), junk),
    "repetition_penalty": (st.one_of(st.floats(0.01, 10), st.just(1e-300)), junk),
    "stop": (st.one_of(clean_text.filter(bool), st.lists(st.sampled_from(["x", "\n", "</s>"]), max_size=3)), junk),
    "stream": (st.booleans(), junk),
    "num_frames_per_inference": (st.integers(1, 32), junk),
    "response_format": (st.sampled_from([{"type": "json_object"}, {"type": "text"}, {
        "type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"a": {"type": "integer"}},
                                                          "required": ["a"]}}}]),
                        st.one_of(st.builds(lambda s: {"type": "json_schema", "json_schema": {"schema": s}}, schema),
                                  junk)),
    "nvext": (st.builds(lambda c: {"guided_choice": c}, st.lists(st.sampled_from(["yes", "no", "maybe"]), min_size=1,
                                                                 max_size=3)),
              st.one_of(st.builds(lambda s: {"guided_json": s}, schema),
                        st.integers(1000, 1100).map(lambda n: {"guided_choice": [f"c{i}" for i in range(n)]}), junk)),
    "tools": (st.just([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
              st.one_of(st.lists(tool, max_size=2), junk)),
    "context": (st.lists(clean_text, max_size=2), junk),
    "n": (st.just(1), junk), "logprobs": (st.just(False), junk), "user": (clean_text, junk),
    "beam_width": (st.nothing(), junk), "frequency_penalty": (st.just(0), junk),
}
good_content = st.one_of(clean_text.filter(bool), st.lists(st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": clean_text}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": st.just(PNG)})})),
    min_size=1, max_size=2), st.just(f'Look <img src="{PNG}" /> here'))
good_messages = st.one_of(
    st.builds(lambda c: [{"role": "user", "content": c}], good_content),
    st.builds(lambda a, b: [{"role": "system", "content": a}, {"role": "user", "content": b}], clean_text, clean_text))


@st.composite
def bodies(draw):
    body = {"messages": draw(good_messages)}
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=4, unique=True)):
        good = draw(FIELDS[name][0]) if name != "beam_width" else None
        if good is not None:
            body[name] = good
    if body.get("stream") is not True:
        body.pop("stream_options", None)
    spoil = draw(st.integers(0, 3))
    if spoil == 1:  # one field bad
        name = draw(st.sampled_from(sorted(FIELDS)))
        body[name] = draw(FIELDS[name][1])
    elif spoil == 2:  # the messages bad
        body["messages"] = draw(st.one_of(st.lists(message, min_size=1, max_size=3), junk))
    elif spoil == 3 and draw(st.booleans()):  # not even an object
        return draw(junk)
    return body


@pytest.fixture(scope="module")
def client(tiny_vila, tmp_path_factory):
    model = load_model(tiny_vila, device="cpu", progress=False)
    app, worker = in_process(model, max_queue=4, gen_defaults=GenerationConfig(max_new_tokens=4),
                             media=MediaLimits(media_dir=tmp_path_factory.mktemp("media")))
    with TestClient(app) as c:
        yield c
    worker.close()


def answers(client) -> None:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.function_scoped_fixture])
@given(body=bodies(), nim=st.booleans())
def test_every_body_gets_a_200_or_a_json_4xx(client, body, nim):
    path = "/v1/vlm/nvidia/vila" if nim else "/v1/chat/completions"
    r = client.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        assert r.json()["object"] == "chat.completion"
    answers(client)
