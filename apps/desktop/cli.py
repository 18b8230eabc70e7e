"""`edge-vlm app`: open the desktop chat window."""

from __future__ import annotations

EXAMPLES = """examples:
  edge-vlm app                                  # pick a model folder in the window
  edge-vlm app --model ./VILA1.5-3b-awq --camera 0
  edge-vlm app --model ./my-vila --device cpu --max-context 2048

needs the app extra: pip install 'edge-vlm[app]'
"""


def register(sub) -> None:
    import argparse

    import markdown  # noqa: F401 - fail here, so `edge-vlm app` says which extra to install
    import PySide6  # noqa: F401

    p = sub.add_parser("app", help="desktop chat window with webcam (needs edge-vlm[app])",
                       description="A native chat window: ask about photos (attach, drop or paste them) and "
                                   "about what your webcam sees (Snap a frame, or Live: a standing question "
                                   "every few seconds). The model runs in a background thread on your GPU.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder or Hugging Face repo id to load at start")
    p.add_argument("--camera", metavar="INDEX_OR_FILE",
                   help="start this webcam (0, 1, ...) or video file at start")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--max-context", type=int, help="context window in tokens (default: min(model limit, 4096))")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from PySide6.QtWidgets import QApplication

    from .window import MainWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("edge-vlm")
    win = MainWindow()
    panel = win.model_panel
    if args.device:
        panel.device.setCurrentText(args.device)
    if args.max_context:
        panel.max_context.setValue(args.max_context)
    win.show()
    if args.model:
        panel.path.setCurrentText(args.model)
        win.load_model()
    if args.camera is not None:
        source = int(args.camera) if str(args.camera).isdigit() else args.camera
        if isinstance(source, int):
            win.camera_panel.set_source_index(source)
        win.start_camera(source)
    return app.exec()
