"""`edge-vlm camera`: point a camera at a scene and get a continuous stream of answers and alerts."""
