"""Perplexity of 16-bit vs RTN vs AWQ 4-bit weights of the same model, in one run.

Calibration uses the first 80% of the built-in pydoc prose, evaluation the first
`--eval-tokens` tokens of the last 20% (never seen during calibration). Both quantized models
are written to disk by the real pipeline and loaded back by the runtime (WQLinear), so the
numbers are those of the checkpoints a user would get.

    python -m edge_vlm.benchmarks.quality                      # the real SmolLM2-135M (group 64)
    python -m edge_vlm.benchmarks.quality --model ./my-llm --group-size 128 --n-samples 128
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch


def held_out_ids(tokenizer, n_tokens: int) -> list[int]:
    from edge_vlm.quantize.calibration import held_out_text

    ids = tokenizer.encode(held_out_text())
    if len(ids) < n_tokens:
        raise SystemExit(f"held-out text has only {len(ids)} tokens, {n_tokens} requested")
    return ids[:n_tokens]


def evaluate(model_dir, ids, window: int) -> float:
    from edge_vlm import load_model
    from edge_vlm.perplexity import perplexity

    # the reference modules: quality is a property of the weights, not of a fast path's roundings
    model = load_model(str(model_dir), device="cpu", dtype=torch.float32, progress=False, fast_path=False)
    return perplexity(model.llm, ids, window=window)


def run(model: str | None, group_size: int | None, n_samples: int, seqlen: int, eval_tokens: int,
        window: int, out_dir: str | None, device: str | None, search_tokens: int = 4096,
        clip: bool = True) -> dict:
    from edge_vlm.tokenizer import Tokenizer
    from edge_vlm.quantize.pipeline import QuantizeSettings, inspect_source, quantize_checkpoint

    if model is None:
        from .real_model import smollm2_folder

        model = str(smollm2_folder())
    src = inspect_source(model)
    ids = held_out_ids(Tokenizer(src.llm_dir), eval_tokens)
    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="edge-vlm-quality-"))
    rows = {"16-bit": {"ppl": evaluate(src.llm_dir, ids, window), "seconds": 0.0}}
    for method in ("rtn", "awq"):
        settings = QuantizeSettings(method=method, group_size=group_size, n_samples=n_samples, seqlen=seqlen,
                                    device=device, search_tokens=search_tokens, clip=clip)
        summary = quantize_checkpoint(model, work / method, settings, force=True)
        rows[method.upper()] = {"ppl": evaluate(summary.out, ids, window), "seconds": summary.seconds,
                                "group": summary.group_size, "mib": summary.bytes_after / 2**20}
    return rows


def table(rows: dict) -> str:
    fp, rtn, awq = rows["16-bit"]["ppl"], rows["RTN"]["ppl"], rows["AWQ"]["ppl"]
    g = rows["AWQ"]["group"]
    lines = ["| weights | perplexity | vs 16-bit | quantize time |", "|---|---|---|---|",
             f"| 16-bit | {fp:.2f} | - | - |"]
    for name in ("RTN", "AWQ"):
        r = rows[name]
        lines.append(f"| {name} W4 g{g} | {r['ppl']:.2f} | {100 * (r['ppl'] / fp - 1):+.1f}% | {r['seconds']:.0f} s |")
    recovered = (rtn - awq) / (rtn - fp) if rtn > fp else float("nan")
    lines.append("")
    lines.append(f"AWQ recovers {100 * recovered:.0f}% of the perplexity RTN loses (target >= 50%).")
    return "\n".join(lines)


def memory_projection(shape: str, context: int = 4096, group_size: int = 128) -> list[tuple[str, int, int]]:
    """(variant, weight bytes, KV-cache bytes) of an LLM of `shapes.LLM_SHAPES`, counted on the meta
    device (no weights needed)."""
    from edge_vlm.config import QuantConfig
    from edge_vlm.kv_cache import kv_cache_bytes
    from edge_vlm.vlm import weight_bytes

    from .shapes import llm_config, meta_llm

    cfg = llm_config(shape)
    kv = kv_cache_bytes(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, context, 2)  # fp16 K and V
    q = QuantConfig(bits=4, group_size=group_size)
    head = QuantConfig(bits=4, group_size=group_size, quantize_lm_head=True)
    head_emb = QuantConfig(bits=4, group_size=group_size, quantize_lm_head=True, quantize_embedding=True)
    return [(label, weight_bytes(meta_llm(cfg, qcfg)), kv) for label, qcfg in (
        ("16-bit", None),
        (f"int4 g{group_size} linears, 16-bit lm_head", q),
        (f"int4 g{group_size} linears + int4 lm_head", head),
        (f"int4 g{group_size} linears + int4 lm_head + int8 embeddings", head_emb))]


def memory_table(rows, context: int) -> str:
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    lines = [f"| LLM weights | weights | KV cache ({context} tokens, fp16) | total |", "|---|---|---|---|"]
    lines += [f"| {name} | {gb(w)} | {gb(kv)} | {gb(w + kv)} |" for name, w, kv in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="16-bit LLM folder (default: the real SmolLM2-135M test model)")
    p.add_argument("--group-size", type=int, help="default: 128, or 64 where widths need it (SmolLM2)")
    p.add_argument("--n-samples", type=int, default=32, help="calibration samples (default 32)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=512, help="perplexity window (default 512)")
    p.add_argument("--out-dir", help="keep the quantized folders here (default: a temporary folder)")
    p.add_argument("--search-tokens", type=int, default=4096, help="tokens scoring each AWQ scale (default 4096)")
    p.add_argument("--no-clip", action="store_true", help="AWQ without the clipping search (ablation)")
    p.add_argument("--device", help="device for quantizing (evaluation runs on CPU in fp32)")
    p.add_argument("--memory-projection", action="store_true",
                   help="only print the projected memory of Nemotron-Mini-4B (Nemovision-4B's LLM) at 4096 tokens")
    a = p.parse_args(argv)
    if a.memory_projection:
        print(memory_table(memory_projection("nemotron-mini-4b"), 4096))
        return 0
    rows = run(a.model, a.group_size, a.n_samples, a.seqlen, a.eval_tokens, a.window, a.out_dir, a.device, a.search_tokens,
               not a.no_clip)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
