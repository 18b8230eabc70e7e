"""`edge-vlm serve`: load one model and serve it over HTTP (OpenAI chat completions, NIM VILA).

The port is open at once (`/v1/health/live`); the model loads in the background and
`/v1/health/ready` turns 200 when it can answer.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

EXAMPLES = """\
examples:
  edge-vlm serve --model ./VILA1.5-3b-awq                       # http://127.0.0.1:8000, page at /
  EDGE_VLM_API_KEY="$(cat key.txt)" edge-vlm serve --model ./VILA1.5-3b-awq --host 0.0.0.0
                         # the key from the environment: --api-key would show in `ps` and /proc/PID/cmdline
  edge-vlm serve --model ./VILA1.5-3b-awq --parallel 4            # 4 requests decoded together (llama.cpp)
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"messages":[{"role":"user","content":"Hello"}],"max_tokens":32}'
"""


def register(sub) -> None:
    import argparse

    from edge_vlm.cli.options import DEFAULT_MODEL, add_generation_options, add_model_options

    p = sub.add_parser("serve", help="serve a model over HTTP: OpenAI chat completions and the NIM VILA API",
                       description="Serve one model to any program: POST /v1/chat/completions (OpenAI), "
                                   "POST /v1/vlm/nvidia/vila (NIM), GET /v1/models, /v1/health/live|ready, "
                                   "/metrics, the OpenAPI schema at /openapi.json and a chat page at /. "
                                   "Without a key it answers only requests addressed to a loopback name "
                                   "(see --allowed-hosts); the README's Security section lists every limit.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder or Hugging Face repo id (default: "
                                                          f"{DEFAULT_MODEL})")
    p.add_argument("--served-model-name", action="append", default=[], metavar="NAME",
                   help="the id in /v1/models (default: the model folder's name); repeat to add aliases")
    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument("--api-key", default=os.environ.get("EDGE_VLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $EDGE_VLM_API_KEY, "
                        "else no key; prefer the variable: a flag shows in `ps` and /proc/PID/cmdline)")
    g.add_argument("--allowed-hosts", action="append", default=[], metavar="NAME",
                   help="without a key, also answer requests whose Host header is NAME (repeat; '*' for any). "
                        "Default: loopback names only (localhost, 127.0.0.1, ::1), so a web page cannot reach the "
                        "server through DNS rebinding; with a key every host name is answered")
    g.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN to call the API (repeat; default: none)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-queue", type=int, default=16, help="requests waiting or running; beyond it 503 (default 16)")
    g.add_argument("--max-connections", type=int, default=64,
                   help="open client connections; a new one beyond it is closed at once (default 64)")
    g.add_argument("--header-timeout", type=float, default=10, metavar="SECONDS",
                   help="a request's line and headers must arrive within this, else the connection is closed "
                        "(default 10)")
    g.add_argument("--body-timeout", type=float, default=30, metavar="SECONDS",
                   help="a request's body must arrive within this, else 408 (default 30)")
    g.add_argument("--keep-alive-timeout", type=float, default=5, metavar="SECONDS",
                   help="an idle keep-alive connection is closed after this (default 5)")
    g.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="answer up to N requests at once, their tokens decoded together in llama.cpp (needs the "
                        "llama.cpp backend; N times the KV cache). Default 1: one at a time, in arrival order")
    g.add_argument("--max-body-mb", type=float, default=20, help="largest request body in MB (default 20)")
    g.add_argument("--request-timeout", type=float, default=300, metavar="SECONDS",
                   help="stop a request this long after it arrived, media fetch and queue wait included (default 300)")
    g.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="largest image or video frame, width x height (default 40M; guards decompression bombs)")
    g.add_argument("--max-request-pixels", type=int, default=80_000_000,
                   help="decoded pixels of one request's images and video frames together, read from their headers "
                        "before decoding (default 80M, about 240 MB as RGB); beyond it 400")
    g.add_argument("--max-server-pixels", type=int, default=160_000_000,
                   help="decoded pixels of all requests being decoded at once; beyond it 503 (default 160M)")
    g.add_argument("--max-images", type=int, default=32, help="images plus video frames in one request (default 32)")
    g.add_argument("--image-cache", type=int, default=64, metavar="N",
                   help="image embeddings kept by content hash (default 64; 0 = off)")
    g.add_argument("--allow-remote-media", action="store_true",
                   help="let requests give http(s):// image URLs: fetched only from public addresses (every "
                        "redirect checked, at most 3), within the body size limit and --remote-media-timeout")
    g.add_argument("--remote-media-hosts", action="append", default=[], metavar="HOST",
                   help="with --allow-remote-media, fetch only from these (repeat or comma-separate): a name "
                        "(images.example.com), subdomains (.example.com), or an IP network (10.0.0.0/8) whose "
                        "private addresses are then allowed too")
    g.add_argument("--remote-media-timeout", type=float, default=10, metavar="SECONDS",
                   help="one remote fetch, redirects included, never past --request-timeout (default 10)")
    g.add_argument("--media-dir", metavar="DIR", help="let requests give file:// URLs under DIR")
    add_generation_options(p.add_argument_group("default answer settings (a request's own fields win)"))
    add_model_options(p)
    p.set_defaults(func=run)


def _log(msg: str) -> None:
    print(f"edge-vlm serve: {msg}", file=sys.stderr, flush=True)


def config_from_args(args):
    from edge_vlm.cli.options import generation_config
    from edge_vlm.errors import EdgeVLMError

    from .app import ServerConfig
    from .media import MediaLimits

    if args.max_queue < 1:
        raise EdgeVLMError("--max-queue must be at least 1")
    if args.parallel < 1:
        raise EdgeVLMError("--parallel must be at least 1")
    if args.parallel > 1 and args.llm_backend == "torch":
        raise EdgeVLMError("--parallel decodes requests together in llama.cpp: use --backend llama.cpp or auto, "
                           "or --parallel 1 with --backend torch")
    if args.media_dir and not Path(args.media_dir).is_dir():
        raise EdgeVLMError(f"--media-dir is not a folder: {args.media_dir}")
    for flag in ("max_connections", "max_request_pixels", "max_server_pixels"):
        if getattr(args, flag) < 1:
            raise EdgeVLMError(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("header_timeout", "body_timeout", "keep_alive_timeout", "remote_media_timeout", "request_timeout"):
        if not getattr(args, flag) > 0:
            raise EdgeVLMError(f"--{flag.replace('_', '-')} must be more than 0 seconds")
    if args.remote_media_hosts and not args.allow_remote_media:
        raise EdgeVLMError("--remote-media-hosts needs --allow-remote-media")
    hosts = tuple(h.strip() for entry in args.remote_media_hosts for h in entry.split(",") if h.strip())
    names = args.served_model_name or [Path(str(args.model).rstrip("/")).name or str(args.model)]
    max_bytes = int(args.max_body_mb * 2**20)
    return ServerConfig(
        model_id=names[0], aliases=(*names[1:], str(args.model), "nvidia/vila"), api_key=args.api_key or None,
        max_body_bytes=max_bytes, request_timeout_s=args.request_timeout, cors_origins=tuple(args.cors),
        allowed_hosts=tuple(h.lower() for h in args.allowed_hosts), body_timeout_s=args.body_timeout,
        max_server_pixels=args.max_server_pixels,
        media=MediaLimits(max_pixels=args.max_image_pixels, max_images=args.max_images, max_bytes=max_bytes,
                          max_request_pixels=args.max_request_pixels, remote=args.allow_remote_media,
                          remote_hosts=hosts, remote_timeout_s=args.remote_media_timeout,
                          media_dir=Path(args.media_dir) if args.media_dir else None),
        gen_defaults=generation_config(args))


def uvicorn_config(app, args):
    """uvicorn's settings for `app`: its own limits where it has them (idle keep-alive, header
    size, requests at once), and ours (sockets.py) for the connection cap and the header deadline."""
    import uvicorn

    from .sockets import HEADER_LIMIT_BYTES, guarded_h11

    return uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5,
                          http=guarded_h11(args.max_connections, args.header_timeout),
                          timeout_keep_alive=args.keep_alive_timeout, h11_max_incomplete_event_size=HEADER_LIMIT_BYTES,
                          limit_concurrency=args.max_connections + 1)  # (uvicorn counts the new one itself)


def exposure_warning(args, config) -> str | None:
    """The warning for a server that listens beyond this machine with no key."""
    from .app import loopback_host

    if config.api_key or loopback_host(args.host):
        return None
    hosts = ("; requests are answered for Host " + ", ".join(config.allowed_hosts)) if config.allowed_hosts else (
        "; only requests addressed to a loopback name are answered (add --allowed-hosts NAME for the names "
        "clients use)")
    return (f"warning: listening on {args.host} without an API key: anyone who can reach this port can use the "
            f"model{hosts}; set EDGE_VLM_API_KEY to require a key")


def run(args) -> int:
    import uvicorn

    from edge_vlm.cli.options import load_from_args

    from .app import create_app
    from .metrics import Metrics
    from .parallel import ParallelWorker
    from .worker import ModelWorker

    config = config_from_args(args)
    options = dict(max_queue=args.max_queue, image_cache=args.image_cache, max_context=args.max_context,
                   metrics=Metrics())
    worker = ParallelWorker(args.parallel, **options) if args.parallel > 1 else ModelWorker(**options)
    app = create_app(worker, config)
    server = uvicorn.Server(uvicorn_config(app, args))
    warning = exposure_warning(args, config)
    if warning:
        _log(warning)
    failed: list[BaseException] = []

    def load() -> None:
        try:
            worker.attach(load_from_args(args))
            _log(f"ready: {config.model_id} on http://{args.host}:{args.port} (chat page at /)")
        except BaseException as e:  # noqa: BLE001 - reported by the main thread, then the server stops
            failed.append(e)
            server.should_exit = True

    _log(f"listening on http://{args.host}:{args.port}; loading {args.model}")
    threading.Thread(target=load, name="edge-vlm-load", daemon=True).start()
    server.run()
    worker.close()
    if failed:
        raise failed[0]
    return 0
