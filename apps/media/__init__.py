"""Frames for the apps: capture sources, GStreamer pipelines, the newest-frame buffer and scene change.

Shared by the desktop app and the camera pipeline; the runtime (edge_vlm's core) never sees a
camera, only the images the apps hand to `ChatSession.ask`.
"""
