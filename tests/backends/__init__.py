"""Tests of the backends: kernels and their self-checks, llama.cpp, ONNX Runtime, the first-run check."""
