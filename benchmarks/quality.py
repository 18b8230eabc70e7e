"""Perplexity of 16-bit vs RTN vs AWQ (and its variants) 4-bit weights of the same model, per
held-out text domain, in one run.

Calibration is the built-in mix of quantize/calibration.py (standard-library prose, code and chat
turns, READMEs of torch's and requests' dependencies); evaluation is every domain of benchmarks/text_domains.py (third-party packages only:
numpy's docs, the dependencies' READMEs, jinja2/tqdm source, chat turns about torch.nn), plus the
held-out tail of the calibration prose as an in-domain reference. Every quantized model is
written to disk by the real pipeline and loaded back by the runtime (WQLinear), so the numbers
are those of the checkpoints a user would get. recovery = (RTN - method) / (RTN - 16-bit).

    python -m edge_vlm.benchmarks.quality                      # the real SmolLM2-135M (group 64), default AWQ
    python -m edge_vlm.benchmarks.quality --variants awq,awq-rtn,gptq --n-samples 32
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

# name -> QuantizeSettings fields (over the defaults): the rows the benchmark can compare
VARIANTS = {
    "rtn": dict(method="rtn"),
    "awq": dict(),                                                   # the default: AWQ scales + GPTQ rounding on
                                                                     # clipped grids, H from every calibration token
    "awq-h16k": dict(hessian_tokens=16384),                          # ... H from 16k tokens (the previous cap)
    "awq-gptq-noclip": dict(rounding="gptq", clip=False),            # ... GPTQ on each group's min-max grid
    "awq-gptq-damp": dict(gptq_damp=0.1, hessian_tokens=16384),
    "awq-rtn": dict(rounding="rtn", hessian_tokens=16384),          # the previous default: clipping + rounding
    "awq-clip-damp": dict(rounding="rtn", clip_damp=0.1),            # ... clipping regularised toward none
    "awq-noclip": dict(rounding="rtn", clip=False),                  # AWQ scales + rounding
    "awq-v1": dict(rounding="rtn", hessian=False),                   # token-sample losses, clipping on 512 tokens
    "awq-noduo": dict(duo_scaling=False),
    "gptq": dict(method="gptq"),                                     # GPTQ alone, no scales
}
IN_DOMAIN = "pydoc (in-domain)"


def eval_sets(src, eval_tokens: int, window: int, in_domain: bool = True) -> dict[str, list[int]]:
    from edge_vlm.quantize.calibration import held_out_text
    from edge_vlm.quantize.pipeline import chat_template_of
    from edge_vlm.tokenizer import Tokenizer

    from .text_domains import domain_ids

    tok = Tokenizer(src.llm_dir)
    sets = domain_ids(tok.encode, eval_tokens, chat_template_of(tok, src.llm.arch), piece=window)
    if in_domain:
        sets[IN_DOMAIN] = tok.encode(held_out_text())[:eval_tokens]
    return sets


def evaluate(model_dir, sets: dict[str, list[int]], window: int) -> dict[str, float]:
    from edge_vlm import load_model
    from edge_vlm.models.perplexity import perplexity

    # the reference modules: quality is a property of the weights, not of a fast path's roundings
    model = load_model(str(model_dir), device="cpu", dtype=torch.float32, progress=False, fast_path=False)
    return {name: perplexity(model.llm, ids, window=window) for name, ids in sets.items()}


def run(model: str | None, group_size: int | None, n_samples: int, seqlen: int, eval_tokens: int,
        window: int, out_dir: str | None, device: str | None, variants=("rtn", "awq"), search_tokens: int = 4096,
        cache: str | None = None) -> dict:
    """{row: {"ppl": {domain: perplexity}, "seconds": quantize time, ...}}. `cache` (a JSON file) keeps
    finished rows, keyed by everything that decides them, so a later run adds variants without redoing
    the others."""
    from edge_vlm.quantize.calibration import MIX
    from edge_vlm.quantize.pipeline import QuantizeSettings, inspect_source, quantize_checkpoint

    if model is None:
        from .real_model import smollm2_folder

        model = str(smollm2_folder())
    src = inspect_source(model)
    sets = eval_sets(src, eval_tokens, window)
    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="edge-vlm-quality-"))
    store = json.loads(Path(cache).read_text()) if cache and Path(cache).is_file() else {}
    base_key = dict(model=str(Path(model).resolve()), eval_tokens=eval_tokens, window=window)

    def cached(key: dict, compute):
        k = json.dumps({**base_key, **key}, sort_keys=True)
        if k not in store:
            store[k] = compute()
            if cache:
                Path(cache).write_text(json.dumps(store, indent=1))
        return store[k]

    rows = {"16-bit": cached({"row": "16-bit"}, lambda: {"ppl": evaluate(src.llm_dir, sets, window),
                                                         "seconds": 0.0})}
    for name in variants:
        over = VARIANTS[name]
        settings = QuantizeSettings(group_size=group_size, n_samples=n_samples, seqlen=seqlen, device=device,
                                    search_tokens=search_tokens, **over)
        key = {"row": name, "group_size": group_size,
               **({} if name == "rtn" else dict(n_samples=n_samples, seqlen=seqlen, search_tokens=search_tokens,
                                                 mix=",".join(f"{k}{w}" for k, w in MIX)))}

        def compute(name=name, settings=settings):
            summary = quantize_checkpoint(model, work / name, settings, force=True)
            print(summary.text(), file=sys.stderr)
            return {"ppl": evaluate(summary.out, sets, window), "seconds": summary.seconds,
                    "group": summary.group_size, "mib": summary.bytes_after / 2**20,
                    "calibration": summary.calibration}
        rows[name] = cached(key, compute)
    return rows


def recovery(rows: dict, name: str, domain: str) -> float:
    fp, rtn, q = (rows[r]["ppl"][domain] for r in ("16-bit", "rtn", name))
    return (rtn - q) / (rtn - fp) if rtn > fp else float("nan")


def table(rows: dict) -> str:
    domains = list(rows["16-bit"]["ppl"])
    held = [d for d in domains if d != IN_DOMAIN]
    head = "| weights | " + " | ".join(domains) + " | held-out recovery: per domain (average) | quantize time |"
    lines = [head, "|" + "---|" * (len(domains) + 3)]
    g = next((r["group"] for r in rows.values() if "group" in r), "?")
    for name, r in rows.items():
        cells = [f"{r['ppl'][d]:.2f}" for d in domains]
        if name in ("16-bit", "rtn"):
            rec = "-"
        else:
            per = [recovery(rows, name, d) for d in held]
            rec = " / ".join(f"{100 * v:.0f}%" for v in per) + f" ({100 * sum(per) / len(per):.0f}%)"
            if IN_DOMAIN in domains:
                rec += f"; in-domain {100 * recovery(rows, name, IN_DOMAIN):.0f}%"
        label = name if name == "16-bit" else f"{name} W4 g{g}"
        t = "-" if name == "16-bit" else f"{r['seconds']:.0f} s"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {rec} | {t} |")
    return "\n".join(lines)


def memory_projection(shape: str, context: int = 4096, group_size: int = 128) -> list[tuple[str, int, int]]:
    """(variant, weight bytes, KV-cache bytes) of an LLM of `shapes.LLM_SHAPES`, counted on the meta
    device (no weights needed)."""
    from edge_vlm.formats.configs import QuantConfig
    from edge_vlm.models.kv_cache import kv_cache_bytes
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
    p.add_argument("--n-samples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=4096,
                   help="tokens per evaluation domain (default 4096: 1024 was too noisy to rank methods)")
    p.add_argument("--window", type=int, default=512, help="perplexity window (default 512)")
    p.add_argument("--variants", default="rtn,awq", help=f"comma-separated rows: {', '.join(VARIANTS)}")
    p.add_argument("--out-dir", help="keep the quantized folders here (default: a temporary folder)")
    p.add_argument("--cache", help="JSON file keeping finished rows between runs")
    p.add_argument("--search-tokens", type=int, default=4096, help="tokens scoring each MLP scale (default 4096)")
    p.add_argument("--device", help="device for quantizing (evaluation runs on CPU in fp32)")
    p.add_argument("--memory-projection", action="store_true",
                   help="only print the projected memory of Nemotron-Mini-4B (Nemovision-4B's LLM) at 4096 tokens")
    a = p.parse_args(argv)
    if a.memory_projection:
        print(memory_table(memory_projection("nemotron-mini-4b"), 4096))
        return 0
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if "rtn" not in variants:
        variants.insert(0, "rtn")
    rows = run(a.model, a.group_size, a.n_samples, a.seqlen, a.eval_tokens, a.window, a.out_dir, a.device, variants,
               a.search_tokens, a.cache)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
