"""GET /metrics: Prometheus text format, from prometheus_client, one registry per server."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("edge_vlm_requests", "HTTP requests by route kind and status code",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("edge_vlm_prompt_tokens", "prompt tokens of answered requests", registry=r)
        self.cached_prompt_tokens = Counter("edge_vlm_cached_prompt_tokens",
                                            "prompt tokens reused from the KV cache", registry=r)
        self.generated_tokens = Counter("edge_vlm_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("edge_vlm_time_to_first_token_seconds", "time to first token (in the model thread)",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("edge_vlm_time_per_output_token_seconds", "decode time per generated token",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("edge_vlm_queue_depth", "requests waiting for the model", registry=r)
        self.cancelled = Counter("edge_vlm_requests_stopped", "generations stopped early", ["reason"], registry=r)
        self.image_hits = Gauge("edge_vlm_image_cache_hits", "images whose embeddings came from the cache",
                                registry=r)
        self.image_misses = Gauge("edge_vlm_image_cache_misses", "images run through the vision tower", registry=r)
        self.memory = Gauge("edge_vlm_memory_bytes", "memory in use: resident set (cpu) or CUDA allocated (cuda)",
                            ["kind"], registry=r)
        self.ready = Gauge("edge_vlm_ready", "1 once the model is loaded", registry=r)
        self.decodes = Gauge("edge_vlm_batched_decodes", "llama.cpp decodes of the --parallel lanes", registry=r)
        self.shared_decodes = Gauge("edge_vlm_batched_decodes_shared", "those decodes that carried several lanes' rows",
                                    registry=r)
        self.decoded_rows = Gauge("edge_vlm_batched_rows", "rows (tokens, image embeddings) those decodes carried",
                                  registry=r)

    def observe(self, stats) -> None:
        """Count one answered request (its GenerationStats)."""
        self.prompt_tokens.inc(stats.cached_prompt_tokens + stats.prompt_tokens)
        self.cached_prompt_tokens.inc(stats.cached_prompt_tokens)
        self.generated_tokens.inc(stats.new_tokens)
        self.ttft.observe(stats.ttft_s)
        if stats.decode_tokens_per_s > 0:
            self.per_token.observe(1 / stats.decode_tokens_per_s)

    def render(self, worker) -> bytes:
        self.ready.set(1 if worker.ready else 0)
        self.queue_depth.set(worker.waiting)
        if worker.image_cache is not None:
            self.image_hits.set(worker.image_cache.hits)
            self.image_misses.set(worker.image_cache.misses)
        batched = getattr(worker, "context", None)  # --parallel: the lanes' shared llama.cpp context
        if batched is not None:
            self.decodes.set(batched.decodes)
            self.shared_decodes.set(batched.shared_decodes)
            self.decoded_rows.set(batched.decoded_rows)
        self.memory.labels("rss").set(rss_bytes())
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self.memory.labels("cuda").set(torch.cuda.memory_allocated())
        except Exception:  # noqa: BLE001 - metrics never fail a scrape
            pass
        return generate_latest(self.registry)


def rss_bytes() -> int:
    """Resident set size of this process now (not the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss
