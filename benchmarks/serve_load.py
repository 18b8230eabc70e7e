"""`edge-vlm serve` under load, side by side with llama.cpp's own OpenAI-compatible server.

Both servers run the real SmolLM2-135M-Instruct on this machine, on the same Q8_0 GGUF: ours
from the fp16 folder with its default CPU backend (llama.cpp over the Q8_0 file it exports once),
at `--parallel 1` (one request at a time) and at each `--parallel N` asked for (N requests'
tokens decoded together); llama.cpp's `python -m llama_cpp.server` on that file (it answers one
request at a time), on the CPU kernels ours uses (same_cpu_kernels.py); `--ours-torch` adds our torch fp32 path. The same chat prompts go to
each at concurrency 1, 4 and 16 as streamed chat completions (greedy, `max_tokens` each); with
`--vila FOLDER` a VILA model also gets rows with an image (ours only: llama.cpp's server has no
vision tower for it). Reported per row: time to first token p50/p99 and inter-token latency p50
(both seen by the client), generated tokens/s and requests/s over the whole wave, errors.

    python -m edge_vlm.benchmarks.serve_load [--requests 16] [--max-tokens 32] [--parallel 4] [--vila DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge_vlm.backends.llamacpp.engine import default_threads

PROMPTS = ["Name three fruits.", "What is the capital of France?", "Write one sentence about the sea.",
           "Give me a tip for learning to code."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, ready_path: str, log, timeout_s: float = 600) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}")
        try:
            if httpx.get(url + ready_path, timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} not ready after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one(client, url: str, content, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": event["error"].get("message", "error")}
                for choice in event.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        stamps.append(time.perf_counter())
    except Exception as e:  # noqa: BLE001 - counted, not fatal
        return {"error": type(e).__name__}
    if not stamps:
        return {"error": "no tokens"}
    return {"ttft": stamps[0] - t0, "gaps": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps),
            "end": stamps[-1] - t0}


async def wave(url: str, contents: list, concurrency: int, n: int, max_tokens: int) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        await one(client, url, contents[0], 4)  # warm-up

        async def limited(i):
            async with sem:
                return await one(client, url, contents[i % len(contents)], max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(n)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttfts = sorted(r["ttft"] for r in ok)
    gaps = sorted(g for r in ok for g in r["gaps"])
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
    return {"ttft_p50": pct(ttfts, 0.5), "ttft_p99": pct(ttfts, 0.99), "itl_p50": pct(gaps, 0.5),
            "tok_s": sum(r["tokens"] for r in ok) / wall, "req_s": len(ok) / wall,
            "errors": len(results) - len(ok), "n": n, "why": sorted({r["error"] for r in results if "error" in r})}


def image_content(text: str) -> list:
    from PIL import Image

    from skimage import data  # scikit-image's public-domain photos (a test dependency)

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, format="JPEG")
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    return [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": text}]


def second_turn_ttft(url: str, repeat: int = 3) -> dict[str, float]:
    """Server-side TTFT (ms, median) of the second turn of an image chat: cold (a new image, nothing
    cached), image embeddings cached but the conversation not in the KV cache, and the usual case of
    a client resending the conversation it had (its prefix, image included, in the KV cache)."""
    import httpx
    from PIL import Image

    from skimage import data

    def uri(img):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def post(messages):
        r = httpx.post(url + "/v1/chat/completions", timeout=900,
                       json={"messages": messages, "max_tokens": 8, "temperature": 0})
        r.raise_for_status()
        return r.json()

    first = lambda im: [{"role": "user", "content": [  # noqa: E731
        {"type": "image_url", "image_url": {"url": im}}, {"type": "text", "text": "What is in this picture?"}]}]
    rows: dict[str, list[float]] = {"cold": [], "image cached": [], "conversation cached": []}
    for i in range(repeat):
        img = data.chelsea().copy()
        img[0, 0] = (i, 7, 7)  # a new image each time: nothing cached
        im = uri(img)
        a1 = post(first(im))["choices"][0]["message"]["content"]
        convo = first(im) + [{"role": "assistant", "content": a1}, {"role": "user", "content": "What colour is it?"}]
        rows["conversation cached"].append(post(convo)["timings"]["ttft_ms"])
        post([{"role": "user", "content": "Hello."}])  # another conversation takes the KV cache
        rows["image cached"].append(post(convo)["timings"]["ttft_ms"])
        img[0, 1] = (i, 9, 9)
        cold = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri(img)}},
                                             {"type": "text", "text": "What is in this picture?"}]},
                {"role": "assistant", "content": a1}, {"role": "user", "content": "What colour is it?"}]
        post([{"role": "user", "content": "Hello."}])
        rows["cold"].append(post(cold)["timings"]["ttft_ms"])
    return {k: statistics.median(v) for k, v in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16, help="requests per row (default 16)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=default_threads(),
                    help="llama_cpp.server's threads (default: the CPUs this process may use, as ours takes)")
    ap.add_argument("--parallel", default="4", help="our server's --parallel values besides 1 (default 4; '' none)")
    ap.add_argument("--ours-torch", action="store_true", help="also our server with --backend torch (fp32)")
    ap.add_argument("--vila", help="a VILA folder for the rows with an image (our server only)")
    args = ap.parse_args()
    from .real_model import smollm2_folder

    folder = smollm2_folder()
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    gguf = work / "smollm2-q8_0.gguf"  # what our server's llama.cpp backend exports the fp16 folder as
    subprocess.run([sys.executable, "-m", "edge_vlm.cli", "export", "gguf", str(folder), str(gguf), "--outtype",
                    "q8_0", "--no-progress"], check=True, cwd=tempfile.gettempdir())
    servers = []
    ours = lambda model, backend, *more: [  # noqa: E731
        sys.executable, "-m", "edge_vlm.cli", "serve", "--model", str(model), "--device", "cpu", "--backend", backend,
        "--max-context", "2048", "--max-queue", "64", *more]
    servers.append(("edge-vlm serve (llama.cpp q8_0)", ours(folder, "llama.cpp"), "/v1/health/ready", PROMPTS))
    for n in [int(v) for v in args.parallel.split(",") if v.strip()]:
        servers.append((f"edge-vlm serve --parallel {n} (llama.cpp q8_0)",
                        ours(folder, "llama.cpp", "--parallel", str(n)), "/v1/health/ready", PROMPTS))
    if args.ours_torch:
        servers.append(("edge-vlm serve (torch fp32)", ours(folder, "torch"), "/v1/health/ready", PROMPTS))
    # llama_cpp.server on the CPU kernels ours uses (same_cpu_kernels.py: the extra-buffer verdict)
    servers.append(("llama_cpp.server (q8_0)", [sys.executable, "-m", "edge_vlm.benchmarks.same_cpu_kernels",
                                               "--model", str(gguf),
                                               "--n_ctx", "2048", "--n_threads", str(args.threads),
                                               "--n_threads_batch", str(args.threads),
                                               # queue concurrent requests as ours does (its default cuts
                                               # the running request short when a new one arrives)
                                               "--interrupt_requests", "False"], "/v1/models", PROMPTS))
    if args.vila:
        servers.append(("edge-vlm serve, 1 image (llama.cpp)", ours(args.vila, "llama.cpp"), "/v1/health/ready",
                        [image_content(p) for p in PROMPTS]))
    rows, turns, running = [], None, []
    try:  # all servers up at once, then each wave goes to each in turn: the machine's load is shared fairly
        for i, (name, cmd, ready, contents) in enumerate(servers):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            log = open(work / f"{i}.log", "wb")
            extra = ["--host", "127.0.0.1"] if "same_cpu_kernels" in cmd[2] else []
            running.append((name, start(cmd + ["--port", str(port)] + extra, url, ready, log), url, contents, log))
        for c in levels:
            for name, _, url, contents, _ in running:
                r = asyncio.run(wave(url, contents, c, max(args.requests, c), args.max_tokens))
                rows.append((name, c, r))
                print(f"{name} c={c}: {r}", file=sys.stderr, flush=True)
        for name, _, url, contents, _ in running:
            if contents is not PROMPTS:
                turns = second_turn_ttft(url)
    finally:
        for _, proc, _, _, log in running:
            stop(proc)
            log.close()
    rows.sort(key=lambda row: [s[0] for s in servers].index(row[0]))
    cpu = platform.processor() or platform.machine()
    print(f"\nSmolLM2-135M-Instruct, {args.requests} streamed requests per row, max_tokens {args.max_tokens}, greedy; "
          f"{os.cpu_count()} CPUs ({cpu}), llama.cpp threads {args.threads}\n")
    print("| server | concurrency | TTFT p50 (ms) | TTFT p99 (ms) | inter-token p50 (ms) | tokens/s | requests/s | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for name, c, r in rows:
        print(f"| {name} | {c} | {r['ttft_p50'] * 1000:.0f} | {r['ttft_p99'] * 1000:.0f} | {r['itl_p50'] * 1000:.1f} | "
              f"{r['tok_s']:.1f} | {r['req_s']:.2f} | {r['errors']} |")
    if turns:
        print("\nSecond turn of an image chat (196 image tokens), server-side time to first token, median of 3:\n")
        print("| second turn | TTFT (ms) |\n|---|---|")
        for k, v in turns.items():
            print(f"| {k} | {v:.0f} |")


if __name__ == "__main__":
    main()
