"""`edge-vlm camera --server URL`: ask a running `edge-vlm serve` instead of a model of our own.

`RemoteSession` provides the session contract (edge_vlm.contracts.Session: `reset`, `ask`,
`stats`, `system`) as `ChatSession` does, so the loop is the same; each question goes to the
server's chat completions with its frames as PNG data URIs (lossless: the server sees the pixels
a local model would) and the answer streams back as server-sent events, its usage and timings
last (they fill `stats`). Several cameras on one board can so share one loaded model.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator

import numpy as np
from PIL import Image

from edge_vlm.contracts import KEEP, GenerationStats, Keep
from edge_vlm.errors import EdgeVLMError

STOP_REASONS = {"stop": "eos", "length": "max_new_tokens", "tool_calls": "eos"}  # OpenAI's finish_reason -> ours


def data_uri(rgb) -> str:
    image = rgb if isinstance(rgb, Image.Image) else Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class RemoteSession:
    """A session on a running `edge-vlm serve`: each question is its own conversation there."""

    def __init__(self, url: str, api_key: str | None = None, system: str | None = None, timeout_s: float = 600.0,
                 http=None):
        """`http`: the httpx.Client to send with (default: one for `url`, with the key's header)."""
        import httpx  # the server's extra (edge-vlm[serve])

        self.url = url.rstrip("/")
        self.system = system
        self._stats = GenerationStats(backend="edge-vlm serve")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = http if http is not None else httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def check(self) -> str:
        """The served model's id; a clear error when the server is not there or not ready."""
        import httpx

        try:
            ready = self._http.get("/v1/health/ready")
            models = self._http.get("/v1/models")
        except httpx.HTTPError as e:
            raise EdgeVLMError(f"cannot reach the server at {self.url}: {type(e).__name__}") from None
        if ready.status_code != 200:
            raise EdgeVLMError(f"the server at {self.url} is not ready (HTTP {ready.status_code})")
        if models.status_code != 200:
            raise EdgeVLMError(f"the server at {self.url} refused /v1/models: {_message(models)}")
        return models.json()["data"][0]["id"]

    @property
    def stats(self) -> GenerationStats:
        """The last answer's, as the server reported them (its usage and timings)."""
        return self._stats

    def reset(self, system: str | None | Keep = KEEP) -> None:
        """Each question is its own conversation: nothing is kept here but the system prompt."""
        if system is not KEEP:
            self.system = system

    def ask(self, text: str, images=(), gen=None, stop_event: threading.Event | None = None) -> Iterator[str]:
        import httpx

        content = [{"type": "image_url", "image_url": {"url": data_uri(im)}} for im in images]
        content.append({"type": "text", "text": text})
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + \
            [{"role": "user", "content": content}]
        body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        if gen is not None:
            body.update(max_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k,
                        repetition_penalty=gen.repetition_penalty, seed=gen.seed, stop=list(gen.stop) or None)
        self._stats = stats = GenerationStats(backend="edge-vlm serve", stop_reason="stopped")
        try:
            with self._http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise EdgeVLMError(f"the server answered HTTP {r.status_code}: {_message(r)}")
                for line in r.iter_lines():
                    if stop_event is not None and stop_event.is_set():
                        return  # closing the stream stops the server's generation
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise EdgeVLMError(f"the server stopped the answer: {event['error']['message']}")
                    if event.get("usage"):
                        _read_usage(stats, event["usage"], event.get("timings") or {})
                    for choice in event.get("choices", []):
                        if choice.get("finish_reason"):
                            stats.stop_reason = STOP_REASONS.get(choice["finish_reason"], choice["finish_reason"])
                        piece = choice["delta"].get("content")
                        if piece:
                            yield piece
        except httpx.HTTPError as e:
            raise EdgeVLMError(f"the server at {self.url} failed: {type(e).__name__}: {e}") from None

    def close(self) -> None:
        self._http.close()


def _read_usage(stats: GenerationStats, usage: dict, timings: dict) -> None:
    """The server's usage and timings of an answer into `stats` (its prompt: cached + run)."""
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    stats.cached_prompt_tokens = cached
    stats.prompt_tokens = usage.get("prompt_tokens", 0) - cached
    stats.new_tokens = usage.get("completion_tokens", 0)
    stats.ttft_s = timings.get("ttft_ms", 0.0) / 1000
    stats.vision_s = timings.get("vision_ms", 0.0) / 1000
    stats.decode_tokens_per_s = timings.get("decode_tokens_per_s", 0.0)


def _message(r) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text[:200]
