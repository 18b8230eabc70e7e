"""`export_gguf`: the language model of any model we load, as a GGUF file llama.cpp runs.

Output types:
- `f32`, `f16`: every matrix in that type (an AWQ checkpoint's weights dequantized);
- `q8_0`: matrices as Q8_0 (gguf's quantizer; our int8 embeddings copied exactly);
- `q4_1-awq`: an AWQ checkpoint's int4 weights as Q4_1 blocks holding the same integers and
  scales (ggml_blocks.py): AWQ's quality without re-quantizing; the rest stays 16-bit;
- `q4_k_m`, `q4_0`, ... : llama.cpp's own quantizer (llama-cpp-python) run on an F16/F32 export
  of a 16-bit checkpoint;
- `auto`: `q4_1-awq` for AWQ checkpoints, `f16` otherwise.
Norms, biases and other vectors are always F32, as llama.cpp expects. Tensors are converted and
written one at a time (bounded memory, a progress bar); the file is written under a temporary
name and renamed when complete, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge_vlm.errors import EdgeVLMError, UnsupportedModelError
from edge_vlm.formats.int4_formats import dequantize_gemm
from edge_vlm.formats.int8_rows import dequantize_int8_rows
from edge_vlm.models.quant_linear import Int8Embedding, WQLinear
from edge_vlm.text.templates import BUILTIN_TEMPLATES

from .engine import llama_cpp_module
from .gguf_arch import GGUF_ARCH, check_supported, tensor_sources, write_hparams

OWN_TYPES = ("f32", "f16", "q8_0", "q4_1-awq")
# llama.cpp quantizer types (gguf.LlamaFileType MOSTLY_*) that need no importance matrix
LLAMACPP_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
                  "q5_k_s", "q5_k_m", "q6_k")
OUTTYPES = ("auto",) + OWN_TYPES + LLAMACPP_TYPES


def gguf_module():
    """The `gguf` package, or one line saying how to install it."""
    try:
        # optional: gguf (the llamacpp extra)
        import gguf
    except ImportError:
        raise EdgeVLMError("GGUF export needs the gguf package: pip install 'edge-vlm[llamacpp]'") from None
    return gguf


# ------------------------------------------------------------------ the tensor plan

class _Planned:
    """One tensor: GGUF name, ggml type, shape (rows, cols) and how to make its data."""

    def __init__(self, source, qtype, shape: tuple[int, ...], make):
        self.name, self.qtype, self.shape, self.make = source.name, qtype, shape, make

    def info(self, gguf):
        q = gguf.GGMLQuantizationType
        if self.qtype in (q.F32, q.F16):
            dtype = np.float32 if self.qtype == q.F32 else np.float16
            return self.shape, np.dtype(dtype), int(np.prod(self.shape)) * np.dtype(dtype).itemsize, None
        # optional: needs gguf (the llamacpp extra)
        from .ggml_blocks import row_bytes

        rows, cols = self.shape
        byte_shape = (rows, row_bytes(cols, self.qtype))
        return byte_shape, np.dtype(np.uint8), rows * byte_shape[1], self.qtype


def _float_weight(module, part: str) -> torch.Tensor:
    """The float value of a weight or bias, dequantizing AWQ / int8 modules (as [out, in])."""
    if part == "bias":
        return module.bias.detach().float()
    if isinstance(module, WQLinear):

        return dequantize_gemm(module.qweight, module.qzeros, module.scales.float(), module.group_size).t()
    if isinstance(module, Int8Embedding):

        return dequantize_int8_rows(module.qweight, module.scales, torch.float32)
    return module.weight.detach().float()


def _matrix_shape(module) -> tuple[int, int]:
    if isinstance(module, WQLinear):
        return module.out_features, module.in_features
    if isinstance(module, Int8Embedding):
        return module.num_embeddings, module.embedding_dim
    return tuple(module.weight.shape)


def _plan_one(src, outtype: str, gguf) -> _Planned:
    # optional: needs gguf (the llamacpp extra)
    from .ggml_blocks import QK, awq_to_q4_1, encode_float, int8_rows_to_q8_0

    q = gguf.GGMLQuantizationType
    if src.module is None:  # a computed vector
        return _Planned(src, q.F32, tuple(src.value.shape), lambda: src.value.float().numpy())
    module = src.module
    if src.part == "bias" or getattr(module, "weight", None) is not None and module.weight.dim() == 1:
        def vector():
            v = _float_weight(module, src.part) + (1.0 if src.plus_one else 0.0)
            return (v[src.rows] if src.rows is not None else v).contiguous().numpy()
        n = module.bias.shape[0] if src.part == "bias" else module.weight.shape[0]
        return _Planned(src, q.F32, (n,), vector)
    rows, cols = _matrix_shape(module)
    order = src.rows

    def floats(qtype):
        def make():
            w = _float_weight(module, "weight")
            return encode_float(w[order] if order is not None else w, qtype)
        return make

    blocks_fit = cols % QK == 0
    if outtype == "q4_1-awq" and isinstance(module, WQLinear):
        return _Planned(src, q.Q4_1, (rows, cols), lambda: awq_to_q4_1(
            module.qweight, module.qzeros, module.scales, module.group_size, order))
    if outtype in ("q4_1-awq", "q8_0") and isinstance(module, Int8Embedding) and blocks_fit:
        return _Planned(src, q.Q8_0, (rows, cols), lambda: int8_rows_to_q8_0(module.qweight, module.scales, order))
    if outtype == "q8_0" and blocks_fit:
        return _Planned(src, q.Q8_0, (rows, cols), floats(q.Q8_0))
    qtype = q.F32 if outtype == "f32" else q.F16
    return _Planned(src, qtype, (rows, cols), floats(qtype))


def plan_tensors(llm, outtype: str) -> list[_Planned]:
    """What export_gguf would write for `llm` with one of OWN_TYPES (name, ggml type, shape)."""

    gguf = gguf_module()
    check_supported(llm.cfg)
    plan = [_plan_one(src, outtype, gguf) for src in tensor_sources(llm)]
    if outtype == "q4_1-awq":
        if not any(p.qtype == gguf.GGMLQuantizationType.Q4_1 for p in plan):
            raise UnsupportedModelError("q4_1-awq needs an AWQ checkpoint (make one with `edge-vlm quantize`); "
                                        "use f16, q8_0 or q4_k_m for 16-bit weights")
        bad = [m.group_size for m in llm.modules() if isinstance(m, WQLinear) and m.group_size % 32]
        if bad:
            raise UnsupportedModelError(f"AWQ group size {bad[0]} does not split into Q4_1 blocks of 32")
    return plan


# ------------------------------------------------------------------ writing

FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_1-awq": "MOSTLY_Q4_1"}


def _chat_template_source(model) -> str | None:
    template = model.template
    if template.name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[template.name].source
    return model.tokenizer.chat_template


def _write(model, path: Path, outtype: str, progress: bool) -> None:
    # optional: needs gguf (the llamacpp extra)
    from .gguf_vocab import gguf_vocab

    gguf = gguf_module()
    llm = model.llm
    cfg = llm.cfg
    plan = plan_tensors(llm, outtype)
    vocab = gguf_vocab(model.tokenizer, cfg.vocab_size, cfg.eos_token_ids, model.template.stop_strings)
    writer = gguf.GGUFWriter(path, GGUF_ARCH[cfg.arch])
    try:
        writer.add_name(Path(str(model.info.path)).name or "model")
        writer.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[outtype])))
        if outtype not in ("f32", "f16"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(writer, cfg)
        vocab.write(writer)
        template = _chat_template_source(model)
        if template:
            writer.add_chat_template(template)
        for p in plan:
            writer.add_tensor_info(p.name, *p.info(gguf))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in tqdm(plan, desc=f"writing GGUF ({outtype})", unit="tensor", disable=not progress,
                      leave=False, file=sys.stderr):
            data = p.make()
            writer.write_tensor_data(np.ascontiguousarray(data))
    finally:
        writer.close()


def _llamacpp_quantize(src: Path, dst: Path, outtype: str) -> None:
    llama_cpp = llama_cpp_module()
    ftype = int(getattr(gguf_module().LlamaFileType, "MOSTLY_" + outtype.upper()))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1

    log = logging.getLogger("llama-cpp-python")  # where llama-cpp-python routes llama.cpp's log lines
    level = log.level
    log.setLevel(logging.ERROR)  # not one "falling back to q5_0" line per tensor whose width is not 256·n
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        log.setLevel(level)
    if rc != 0 or not dst.is_file():
        raise EdgeVLMError(f"llama.cpp could not quantize the export to {outtype} (error {rc})")


def _temp_name(out: Path, tag: str) -> Path:
    return out.with_name(f".{out.name}.{tag}.{os.getpid()}.tmp")


def export_gguf(model, out_path, outtype: str = "auto", progress: bool | None = None) -> Path:
    """Write the language model of a loaded `VisionLanguageModel` (its weights on the CPU, in the
    dtype the checkpoint stores: loading.load_for_export) as GGUF at `out_path`; returns the path.
    `progress`: a tqdm bar (default: when stderr is a tty)."""
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise EdgeVLMError(f"unknown GGUF type {outtype!r}; choose one of: {', '.join(OUTTYPES)}")
    gguf_module()
    show = sys.stderr.isatty() if progress is None else progress
    awq = any(isinstance(m, WQLinear) for m in model.llm.modules())
    if outtype == "auto":
        outtype = "q4_1-awq" if awq else "f16"
    if outtype in LLAMACPP_TYPES:
        if awq:
            raise UnsupportedModelError(f"{outtype} from an AWQ checkpoint would quantize twice; export q4_1-awq "
                                        f"(the AWQ weights as they are) or start from the 16-bit checkpoint")
        llama_cpp_module()  # before spending time on the intermediate file
    out = Path(out_path)
    if out.is_dir():
        raise EdgeVLMError(f"{out} is a folder; give the GGUF file's name")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(out, "part")
    middle = _temp_name(out, "16bit") if outtype in LLAMACPP_TYPES else None
    try:
        if middle is None:
            _write(model, tmp, outtype, show)
        else:
            _write(model, middle, "f16" if model.llm.dtype == torch.float16 else "f32", show)
            _llamacpp_quantize(middle, tmp, outtype)
        os.replace(tmp, out)
    except OSError as e:
        raise EdgeVLMError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        for leftover in (tmp, middle):
            if leftover is not None and leftover.exists():
                leftover.unlink()
    return out
