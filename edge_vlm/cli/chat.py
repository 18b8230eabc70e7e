"""`edge-vlm chat`: one answer streamed to stdout, or an interactive chat (/image, /video, /reset, /quit)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import EdgeVLMError
from ..imaging.preprocess import load_image
from ..session import ChatSession
from .options import (DEFAULT_MODEL, add_generation_options, add_model_options, generation_config, load_from_args,
                      positive_int)


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model about images, video or text",
                       description="Stream an answer to QUESTION, or open an interactive chat without one. "
                                   "In the interactive chat: /image PATH attaches an image to the next question, "
                                   "/video PATH a video, /reset starts over, /quit leaves.")
    p.add_argument("question", nargs="?", help="the question; omit for an interactive chat")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model folder or Hugging Face repo id (default: {DEFAULT_MODEL})")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeat for several)")
    p.add_argument("--video", metavar="PATH", help="a video; --frames frames are sampled evenly from it")
    p.add_argument("--frames", type=positive_int, default=None,
                   help="frames sampled from --video (default: the model's own, e.g. NVILA's num_video_frames; else 8)")
    p.add_argument("--system", help="system prompt (default: the model's own)")
    add_generation_options(p)
    add_model_options(p)
    p.add_argument("--quiet", action="store_true", help="do not print timing and memory after each answer")
    p.set_defaults(func=run_chat)



def _stream(session, question, images, video, args) -> None:
    frames = args.frames or session.model.video_frames
    for piece in session.ask(question, images=images, video=video, frames=frames, gen=generation_config(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if not args.quiet:
        print(f"[{session.stats.summary()}]", file=sys.stderr)


def run_chat(args) -> int:
    images = [load_image(p) for p in args.image]  # fail on a bad image before loading the model
    if args.video and not Path(args.video).is_file():
        raise EdgeVLMError(f"video not found: {args.video}")
    model = load_from_args(args)
    session = ChatSession(model, system=args.system)
    if args.question is not None:
        _stream(session, args.question, images, args.video, args)
        return 0
    return _interactive(session, images, args)


def _interactive(session, images, args) -> int:
    video = args.video
    print("edge-vlm chat: /image PATH, /video PATH, /reset, /quit", file=sys.stderr)
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            images, video = [], None
            print("(new conversation)", file=sys.stderr)
            continue
        if line.startswith("/image "):
            try:
                images.append(load_image(line[7:].strip()))
                print(f"(image attached: {len(images)} waiting for the next question)", file=sys.stderr)
            except EdgeVLMError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        if line.startswith("/video "):
            video = line[7:].strip()
            continue
        if line.startswith("/"):
            print("commands: /image PATH, /video PATH, /reset, /quit", file=sys.stderr)
            continue
        try:
            _stream(session, line, images, video, args)
            images, video = [], None
        except EdgeVLMError as e:  # the conversation goes on; the attachments are kept
            print(f"error: {e}", file=sys.stderr)
