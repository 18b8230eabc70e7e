"""`edge-vlm camera`: the command line of the camera pipeline."""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading

from PIL import Image

DESCRIPTION = """\
Watch a camera, stream, video file or image folder and ask the model about what it sees:
every --interval seconds and/or when the scene changes (--on-change). Each answer is one
JSON line on stdout (timestamp, frame, prompt, answer, latency). Answers can be drawn on
the video (--output), and matching answers raise alerts (--alert, --alert-cmd, --webhook).
Cameras and streams that drop are reconnected; Ctrl-C or SIGTERM stops cleanly.

sources:
  csi://0                 Jetson CSI camera, sensor 0 (GStreamer nvarguscamerasrc)
  0, 1, ...               a webcam by index (any OS; on Linux the /dev/videoN of that number)
  /dev/video0             USB / V4L2 camera by device
  rtsp://HOST/PATH        IP camera or RTSP server (H.264, or --codec h265)
  clip.mp4                a video file (read in order; --interval is in video time)
  ./frames/               a folder of images, in name order (--fps sets their pace)
"""

EXAMPLES = """\
examples:
  edge-vlm camera --model ./VILA1.5-3b-awq --source csi://0 --prompt "Describe what you see." --interval 2
  edge-vlm camera --source /dev/video0 --on-change 0.08 --prompt "Is there a person? Answer yes or no." \\
      --alert yes --alert-cmd "notify-send 'person at the door'" --cooldown 120
  edge-vlm camera --source rtsp://192.168.1.20:8554/cam --prompt "How many cars?" \\
      --webhook http://127.0.0.1:8000/hook --output udp://192.168.1.10:5000
  edge-vlm camera --source clip.mp4 --interval 1 --context-frames 4 --prompt "What happens?" --output out.mp4
"""


def register(sub) -> None:
    import argparse

    from edge_vlm.cli.options import DEFAULT_MODEL, add_model_options, add_generation_options

    p = sub.add_parser("camera", help="answer questions about a live camera or video, continuously",
                       description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model folder or Hugging Face repo id (default: {DEFAULT_MODEL})")
    p.add_argument("--source", required=True, help="camera, stream URL, video file or image folder (see above)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a question asked about each chosen frame; repeat for several (default: describe the scene)")
    p.add_argument("--system", help="system prompt (default: the model's own)")
    p.add_argument("--server", metavar="URL",
                   help="ask a running `edge-vlm serve` at URL instead of loading a model here (cameras share one "
                        "model); the model options are then the server's")
    p.add_argument("--api-key", default=None, help="the server's key (default: $EDGE_VLM_API_KEY)")
    g = p.add_argument_group("when to ask")
    g.add_argument("--interval", type=float, metavar="SECONDS",
                   help="ask every SECONDS (0 = as often as the model can; default 5, or off with --on-change)")
    g.add_argument("--on-change", type=float, nargs="?", const=0.1, metavar="THRESHOLD",
                   help="ask when the scene differs from the last answered frame by THRESHOLD "
                        "(0..1 mean pixel change of a thumbnail; default 0.1)")
    g.add_argument("--context-frames", type=int, default=1, metavar="K",
                   help="show the model the last K answered frames together (motion, events); default 1")
    g.add_argument("--max-frames", type=int, metavar="N", help="stop after N source frames")
    g = p.add_argument_group("answers")
    add_generation_options(g, temperature=0.0, max_new_tokens=64)
    shape = g.add_mutually_exclusive_group()
    shape.add_argument("--choices", metavar="A,B,...",
                       help="constrain every answer to exactly one of these (e.g. yes,no); the JSON line's "
                            "'value' is the choice, and --alert matches it exactly")
    shape.add_argument("--json-schema", metavar="FILE",
                       help="constrain every answer to JSON valid under this schema; the JSON line's 'value' is "
                            "the parsed object, and --alert KEY=VALUE matches a field (dots for nested keys)")
    g = p.add_argument_group("outputs and alerts")
    g.add_argument("--output", metavar="PATH|URL",
                   help="annotated video: a file (.mp4 .avi .mkv) or a stream (udp://HOST:PORT, rtsp://SERVER/PATH)")
    g.add_argument("--alert", metavar="PATTERN",
                   help="alert when an answer matches: 'yes' / 'no' (answer starts with it) or a regex")
    g.add_argument("--alert-cmd", metavar="CMD",
                   help="command run on an alert (gets EDGE_VLM_PROMPT, EDGE_VLM_ANSWER, EDGE_VLM_FRAME, "
                        "EDGE_VLM_TIMESTAMP in its environment)")
    g.add_argument("--webhook", metavar="URL", help="POST each alert's JSON line to URL")
    g.add_argument("--cooldown", type=float, default=60.0, metavar="SECONDS",
                   help="after an alert, stay quiet this long (default 60)")
    g = p.add_argument_group("capture")
    g.add_argument("--width", type=int, help="capture width (cameras)")
    g.add_argument("--height", type=int, help="capture height (cameras)")
    g.add_argument("--fps", type=float, help="capture frame rate (cameras); pace of an image folder (default 1)")
    g.add_argument("--flip", type=int, default=0, help="CSI flip-method 0-7 (nvvidconv; 2 = upside down)")
    g.add_argument("--codec", choices=["h264", "h265"], default="h264", help="RTSP stream codec (default h264)")
    g.add_argument("--backend", choices=["auto", "gstreamer", "opencv"], default="auto",
                   help="OpenCV capture backend (default: GStreamer when OpenCV has it)")
    g.add_argument("--realtime", action="store_true",
                   help="read a file like a live camera: at its frame rate, skipping frames while the model is busy")
    add_model_options(p, backend_flag="--llm-backend")
    p.set_defaults(func=run)


def _log(msg: str) -> None:
    print(f"edge-vlm camera: {msg}", file=sys.stderr, flush=True)


def _check_args(args) -> None:
    from edge_vlm.errors import EdgeVLMError

    if args.interval is not None and args.interval < 0:
        raise EdgeVLMError("--interval must be 0 or more seconds")
    if args.on_change is not None and not 0 < args.on_change < 1:
        raise EdgeVLMError("--on-change THRESHOLD must be between 0 and 1 (e.g. 0.1)")
    if args.context_frames < 1:
        raise EdgeVLMError("--context-frames must be at least 1")
    if (args.alert_cmd or args.webhook) and args.alert is None:
        raise EdgeVLMError("--alert-cmd / --webhook need --alert PATTERN to know when to fire")


def _constraint(args):
    """The answers' constraint from --choices / --json-schema (checked before the model loads), or None."""
    import json
    from pathlib import Path

    from edge_vlm.text.constrained import Constraint
    from edge_vlm.errors import EdgeVLMError

    if args.choices is not None:
        choices = [c.strip() for c in args.choices.split(",") if c.strip()]
        if len(choices) < 2:
            raise EdgeVLMError(f"--choices needs at least two comma-separated answers, got {args.choices!r}")
        return Constraint.parse(choices)
    if args.json_schema is not None:
        try:
            schema = json.loads(Path(args.json_schema).read_text())
        except OSError as e:
            raise EdgeVLMError(f"--json-schema: cannot read {args.json_schema}: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise EdgeVLMError(f"--json-schema: {args.json_schema} is not JSON ({e})") from None
        return Constraint.parse(schema)
    return None


def run(args) -> int:
    from edge_vlm.apps.media.frame_sources import open_source
    from edge_vlm.cli.options import generation_config

    from .alerts import Alerter, AlertRule
    from .outputs import AnnotatedVideo, JsonLines
    from .pipeline import CameraPipeline
    from .triggers import Trigger

    from edge_vlm.errors import EdgeVLMError

    _check_args(args)
    # Everything the user can get wrong fails here, before the (slow) model load.
    source = open_source(args.source, width=args.width, height=args.height, fps=args.fps, backend=args.backend,
                         codec=args.codec, flip=args.flip)
    source.open()
    try:
        interval = args.interval if args.interval is not None else (None if args.on_change is not None else 5.0)
        trigger = Trigger(interval, args.on_change)
        video = AnnotatedVideo(args.output, fps=source.fps or 15.0) if args.output else None
        constraint = _constraint(args)
        if constraint is not None and args.server:
            raise EdgeVLMError("--choices / --json-schema run in this process's sampler: not with --server")
        kind = None if constraint is None else "choice" if constraint.kind == "choice" else "json"
        alerter = (Alerter(AlertRule(args.alert, kind), args.cooldown, args.alert_cmd, args.webhook, log=_log)
                   if args.alert is not None else None)
        gen = dataclasses.replace(generation_config(args), constraint=constraint)
        pipeline = CameraPipeline(
            session=_session(args), source=source,
            prompts=args.prompt or ["Describe what you see in one sentence."], trigger=trigger,
            gen=gen, structured=kind,
            json_out=JsonLines(sys.stdout), video_out=video, alerter=alerter, context_frames=args.context_frames,
            realtime=args.realtime, max_frames=args.max_frames, log=_log)
    except BaseException:
        source.close()
        raise
    with _stop_on_signals(pipeline.stop):
        try:
            stats = pipeline.run()
        except Image.DecompressionBombError as e:  # an image in a folder source too large to decode
            from edge_vlm.errors import EdgeVLMError

            raise EdgeVLMError(f"cannot read an image of {args.source}: {e}") from None
    _log(stats.summary())
    return 0


def _session(args):
    """A ChatSession on a model loaded here, or the server's (`--server URL`)."""
    from edge_vlm.errors import EdgeVLMError

    if args.server:
        import os

        try:
            from .remote import RemoteSession
            session = RemoteSession(args.server, args.api_key or os.environ.get("EDGE_VLM_API_KEY"), args.system)
        except ImportError as e:
            raise EdgeVLMError(f"--server needs httpx: pip install 'edge-vlm[serve]' ({e})") from None
        _log(f"asking {session.check()} at {args.server}")
        return session
    from edge_vlm.cli.options import load_from_args
    from edge_vlm.session import ChatSession

    model = load_from_args(args)
    if not model.is_multimodal:
        raise EdgeVLMError(f"{args.model} is a text-only model: the camera needs a vision-language model")
    return ChatSession(model, system=args.system)


class _stop_on_signals:
    """SIGTERM (systemd stop, docker stop) and a first Ctrl-C set `stop`: the loop ends and flushes.

    A second Ctrl-C raises KeyboardInterrupt as usual, for when something hangs.
    """

    def __init__(self, stop: threading.Event):
        self.stop, self.saved = stop, {}

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self.stop.is_set():
            raise KeyboardInterrupt
        _log(f"{signal.Signals(signum).name}: stopping after the current answer")
        self.stop.set()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)

