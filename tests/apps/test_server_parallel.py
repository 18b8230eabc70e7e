"""`edge-vlm serve --parallel N`: requests answered together give the answers they get alone.

The server runs the real SmolLM2 on llama.cpp with `--parallel 3`. Requests sent one after
another are answered alone; sent all at once, up to three are in flight and their tokens share
llama.cpp decodes. Seeded sampling and greedy decoding must give the same text both ways,
streamed or not, and a conversation that comes back must find its prefix cached in the lane
that had it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.apps.test_server_support import Server, metric

pytestmark = pytest.mark.slow

QUESTIONS = ["Name three fruits.", "What is the capital of France?", "Write one sentence about the sea.",
             "Give me a tip for learning to code.", "What colour is the sky?", "Count from one to five."]


def body(i: int, stream: bool) -> dict:
    return {"messages": [{"role": "user", "content": QUESTIONS[i]}], "max_tokens": 24, "stream": stream,
            "temperature": 0 if i % 2 else 0.8, "seed": 100 + i}


def answer(url: str, b: dict) -> str:
    if not b["stream"]:
        r = httpx.post(url + "/v1/chat/completions", json=b, timeout=600)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    text = ""
    with httpx.stream("POST", url + "/v1/chat/completions", json=b, timeout=600) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    text += c["delta"].get("content") or ""
    return text


@pytest.fixture(scope="module")
def par(smollm2):
    server = Server(smollm2, "--parallel", "3", backend="auto")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def test_answers_together_equal_answers_alone(par):
    bodies = [body(i, stream=i % 3 == 0) for i in range(len(QUESTIONS))]
    want = [answer(par.url, b) for b in bodies]  # one after another: each request alone in a lane
    shared = lambda: metric(httpx.get(par.url + "/metrics", timeout=30).text,  # noqa: E731
                            "edge_vlm_batched_decodes_shared")
    assert shared() == 0
    with ThreadPoolExecutor(len(bodies)) as pool:  # all at once: up to 3 decode together, the rest queue
        got = list(pool.map(lambda b: answer(par.url, b), bodies))
    assert got == want
    assert all(w.strip() for w in want)
    assert shared() > 0  # some decodes carried several lanes' tokens


def test_a_returning_conversation_finds_its_prefix_in_its_lane(par):
    def post(messages):
        r = httpx.post(par.url + "/v1/chat/completions", timeout=600,
                       json={"messages": messages, "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()

    first = [{"role": "user", "content": "My name is Ada. Remember it."}]
    a1 = post(first)["choices"][0]["message"]["content"]
    post([{"role": "user", "content": "Something else entirely."}])  # another conversation, another lane
    again = post(first + [{"role": "assistant", "content": a1}, {"role": "user", "content": "What is my name?"}])
    assert again["timings"]["cached_prompt_tokens"] > 0


def test_parallel_needs_llama_cpp():
    r = subprocess.run([sys.executable, "-m", "edge_vlm.cli", "serve", "--model", "unused", "--backend", "torch",
                        "--parallel", "2"], capture_output=True, text=True, timeout=120, cwd=tempfile.gettempdir())
    assert r.returncode != 0
    assert "--parallel" in r.stderr and "llama.cpp" in r.stderr and "Traceback" not in r.stderr
