"""Reading checkpoints: files and tensor stores, every config spelling, how images are prepared, and the
weight formats (AutoAWQ GEMM, TinyChat, int4 layouts, int8 rows).

Imports only `edge_vlm.errors` and the standard libraries (torch, safetensors, huggingface_hub): what a
checkpoint says is read here, never acted on.
"""
