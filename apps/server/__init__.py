"""`edge-vlm serve`: the NIM VILA API and OpenAI's chat completions over one loaded model."""
