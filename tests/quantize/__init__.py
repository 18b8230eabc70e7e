"""Tests of edge-vlm quantize: AWQ/GPTQ pipeline, formats, quality."""
