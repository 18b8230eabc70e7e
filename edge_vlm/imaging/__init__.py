"""Pictures before the tower: decoding images with bounds, the processors' pixel arithmetic, tiling
(InternVL-style and S2), and video frame sampling.

May import `edge_vlm.formats` (ImageConfig) and `edge_vlm.errors`; nothing above.
"""
