"""The model code in plain torch: the Llama / Qwen2 / Nemotron decoder, its KV cache and rotary tables,
the SigLIP / CLIP / InternViT towers, the projectors, S2 feature merging and video pooling, and the int4
reference layer. Every fast path is tested against these modules.

May import `edge_vlm.formats` (configs, weight formats), `edge_vlm.imaging` (tile plans) and `edge_vlm.errors`;
never a backend.
"""
