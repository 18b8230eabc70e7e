"""The server's limits, on real server subprocesses: the API key (from EDGE_VLM_API_KEY, compared
in constant time), the body size, the bounded queue (503 + Retry-After, no admitted answer lost),
the per-request timeout; and, in process, the 503s before the model is loaded."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from tests.apps.test_server_support import Server

pytestmark = pytest.mark.slow

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HOLD_PROMPT = "Count from 1 to 1000, one number per line."


@pytest.fixture(scope="module")
def locked(smollm2):
    s = Server(smollm2, "--max-context", "1024", "--max-queue", "3", "--max-body-mb", "1",
               env={"EDGE_VLM_API_KEY": KEY}).wait_ready()
    yield s
    s.stop()


def good(server) -> str:
    r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=300,
                   json={"messages": [{"role": "user", "content": "Say yes."}], "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Bearer {KEY}x"}], ids=["none", "wrong", "no-bearer", "longer"])
def test_a_missing_or_wrong_key_is_401_and_the_right_one_works(locked, headers):
    r = httpx.post(locked.url + "/v1/chat/completions", headers=headers, timeout=60,
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error" and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(locked.url + "/v1/models", headers=headers).status_code == 401
    assert httpx.get(locked.url + "/metrics", headers=headers).status_code == 401
    assert httpx.get(locked.url + "/v1/health/ready").status_code == 200  # probes need no key
    good(locked)


def test_the_openai_client_with_the_key(locked):
    client = openai.OpenAI(base_url=locked.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    r = client.chat.completions.create(model="nvidia/vila", messages=[{"role": "user", "content": "Say yes."}],
                                       max_tokens=2, temperature=0)
    assert r.choices[0].message.content == good(locked)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=locked.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_a_body_over_the_limit_is_413(locked):
    big = {"messages": [{"role": "user", "content": "x" * (2 * 2**20)}]}
    r = httpx.post(locked.url + "/v1/chat/completions", headers=AUTH, json=big, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(20):
            yield b" " * 100_000
        yield b'{"messages": []}'

    r = httpx.post(locked.url + "/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"},
                   content=chunked(), timeout=60)
    assert r.status_code == 413
    good(locked)


def _hold(server, got_first: threading.Event, release: threading.Event, seen: list) -> None:
    """A streaming request that would run ~900 tokens: it keeps the model busy until released."""
    body = {"messages": [{"role": "user", "content": HOLD_PROMPT}], "max_tokens": 900, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=600) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                seen.append(line)
                got_first.set()
                if release.is_set():
                    return  # hangs up mid-stream
            if line == "data: [DONE]":
                return


def test_queue_overflow_gives_503_with_retry_after_and_no_admitted_answer_is_lost(locked):
    expected = good(locked)
    got_first, release = threading.Event(), threading.Event()
    seen: list = []
    holder = threading.Thread(target=_hold, args=(locked, got_first, release, seen))
    holder.start()
    assert got_first.wait(600)
    # the model is busy with the holder; --max-queue 3 admits 2 more of the 6 that arrive at once
    results: dict[int, httpx.Response] = {}

    def one(i):
        results[i] = httpx.post(locked.url + "/v1/chat/completions", headers=AUTH, timeout=600, json={
            "messages": [{"role": "user", "content": "Say yes."}], "max_tokens": 2, "temperature": 0})

    burst = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in burst:
        t.start()
    deadline = time.monotonic() + 120  # hang guard
    while sum(r.status_code == 503 for r in list(results.values())) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    release.set()  # the holder hangs up: its generation stops and the queued two run
    holder.join(600)
    for t in burst:
        t.join(600)
    assert sorted(r.status_code for r in results.values()) == [200] * 2 + [503] * 4
    for r in results.values():
        if r.status_code == 503:
            assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["choices"][0]["message"]["content"] == expected
    assert len(seen) < 900
    assert good(locked) == expected


def test_a_request_past_its_timeout_is_504_and_the_server_goes_on(tiny_vila):
    # a timeout every request exceeds (it is checked when the model picks the request up)
    s = Server(tiny_vila, "--request-timeout", "0.000001").wait_ready()
    try:
        for stream in (False, True):
            r = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": stream})
            if stream:  # the stream started (its role chunk) before the model took it up: the error is an event
                events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
                assert r.status_code == 200 and events[-1]["error"]["code"] == "timeout"
            else:
                assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert httpx.get(s.url + "/v1/health/ready").status_code == 200
        assert 'edge_vlm_requests_stopped_total{reason="timeout"} 2.0' in httpx.get(s.url + "/metrics").text
    finally:
        s.stop()


def test_before_the_model_is_loaded_ready_and_chat_are_503():
    from edge_vlm.apps.server.app import ServerConfig, create_app
    from edge_vlm.apps.server.worker import ModelWorker

    app = create_app(ModelWorker(), ServerConfig(model_id="m"))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000") as c:
            return (await c.get("/v1/health/live"), await c.get("/v1/health/ready"),
                    await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}),
                    await c.get("/metrics"))

    live, ready, chat, metrics = asyncio.run(go())
    assert live.status_code == 200 and ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
    assert chat.status_code == 503 and chat.headers["Retry-After"] and chat.json()["error"]["code"] == "not_ready"
    assert "edge_vlm_ready 0.0" in metrics.text


def test_cors_is_off_unless_an_origin_is_given_and_preflights_need_no_key():
    from edge_vlm.apps.server.app import ServerConfig, create_app
    from edge_vlm.apps.server.worker import ModelWorker

    preflight = {"Origin": "http://board.local", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}

    async def go(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000") as c:
            return (await c.options("/v1/chat/completions", headers=preflight),
                    await c.get("/v1/health/live", headers={"Origin": "http://board.local"}))

    off = asyncio.run(go(create_app(ModelWorker(), ServerConfig(api_key="k"))))
    assert all("access-control-allow-origin" not in r.headers for r in off)
    on = asyncio.run(go(create_app(ModelWorker(), ServerConfig(api_key="k", cors_origins=("http://board.local",)))))
    assert on[0].status_code == 200 and on[0].headers["access-control-allow-origin"] == "http://board.local"
    assert on[1].headers["access-control-allow-origin"] == "http://board.local"
    other = asyncio.run(go(create_app(ModelWorker(), ServerConfig(cors_origins=("http://elsewhere",)))))
    assert "access-control-allow-origin" not in other[1].headers
