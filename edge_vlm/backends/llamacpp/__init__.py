"""llama.cpp as a backend for the language model. `gguf_export` writes our LLMs as GGUF files
(needs the `gguf` package; llama.cpp's own quantizer types need llama-cpp-python)."""
