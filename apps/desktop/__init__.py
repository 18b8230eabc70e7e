"""`edge-vlm app`: a native Qt chat window over the runtime, with a webcam panel.

Qt lives only here: the runtime (edge_vlm) never imports the app. Modules:
camera (frame sources + latest-frame feed), conversation (saved chats), render (Markdown -> HTML),
worker (the model in its own thread), chat_view / panels / window (the widgets), cli (the subcommand).
"""
