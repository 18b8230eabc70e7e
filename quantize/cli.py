"""`edge-vlm quantize SRC OUT`: the command-line face of edge_vlm.quantize.pipeline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """\
Quantize the language model of a 16-bit checkpoint to 4-bit weights (W4A16) with AWQ (activation-aware
scales, then GPTQ-style rounding with error compensation on grids picked by a clipping search;
--rounding rtn is the original AWQ's plain rounding after the clipping search), or with plain round-to-nearest (--method rtn, the baseline). The vision tower and projector stay 16-bit. The built-in calibration set mixes prose, code
and chat turns in the model's own template (from Python's standard library) with Markdown READMEs of
packages every install has (torch's and requests' dependencies), so it works offline; the summary
names the sources used.
OUT is written in the AutoAWQ GEMM layout (readable by edge-vlm, transformers and vLLM) and
appears only when complete; an interrupted run continues with --resume.
Runs on CUDA when present (else CPU), one decoder layer at a time. Before the first layer it prints an
estimate of the time on this machine (from the layer shapes and the measured matmul rates), and after it
the time the first layer took; the progress bar counts the minutes left."""

EXAMPLES = """examples:
  edge-vlm quantize ./VILA1.5-3b ./VILA1.5-3b-awq
  edge-vlm quantize ./my-llm ./my-llm-awq --calib notes.txt --n-samples 64
  edge-vlm quantize ./my-vila ./my-vila-awq --calib-images ./photos   # the LLM also sees image tokens
  edge-vlm quantize ./my-llm ./my-llm-rtn --method rtn                  # baseline for comparison
  edge-vlm quantize ./my-llm ./my-llm-awq --resume                      # continue an interrupted run
  edge-vlm quantize ./VILA1.5-3b ./VILA1.5-3b-awq --fast               # a CPU without bf16 speed (AVX2)
"""


def _group_size(text: str):
    return None if text == "auto" else int(text)


def register(sub) -> None:
    p = sub.add_parser("quantize", help="4-bit AWQ quantization of a checkpoint", description=DESCRIPTION,
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="16-bit model folder or Hugging Face repo id")
    p.add_argument("out", metavar="OUT", help="output folder (must not exist unless --force)")
    p.add_argument("--method", choices=["awq", "gptq", "rtn"], default="awq",
                   help="awq (default: AWQ scales, then --rounding), gptq (GPTQ rounding, no scales) or rtn "
                        "round-to-nearest")
    p.add_argument("--rounding", choices=["gptq", "rtn"], default="gptq",
                   help="how AWQ rounds after its scales: gptq error compensation on clipped grids (default: it "
                        "recovered most on held-out text, RESULTS.md) or rtn after the clipping search (the "
                        "original AWQ)")
    p.add_argument("--w-bit", type=int, default=4, help="weight bits (only 4)")
    p.add_argument("--group-size", type=_group_size, default="auto",
                   help="input channels per scale: 128, 64 or 32 (default auto: 128, or 64/32 when a layer "
                        "width is not a multiple of 128, e.g. SmolLM2's 576)")
    p.add_argument("--calib", metavar="FILE", help="calibration text, .txt or .jsonl with {\"text\": ...} lines "
                                                    "(default: the built-in mix of prose, code, chat turns and READMEs)")
    p.add_argument("--calib-images", metavar="DIR", help="images shown to a VLM during calibration")
    p.add_argument("--n-samples", type=int, help="calibration samples (default 128; 64 with --fast)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sample (default 512)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="also store lm_head in 4 bits (saves memory with big vocabularies; our runtime only)")
    p.add_argument("--quantize-embedding", action="store_true",
                   help="also store the token embeddings in int8 (halves the largest 16-bit table of "
                        "big-vocabulary models such as Nemotron; our runtime only)")
    p.add_argument("--matmul", choices=["auto", "fp32", "bf16"], default="auto",
                   help="precision of the layer's forward passes and the scale searches' products (H, GPTQ and "
                        "every error sum stay float32): auto (default) measures both here and takes bf16 where it "
                        "is at least 1.5x faster (CPUs with AMX or AVX512-BF16), float32 elsewhere (AVX2, CUDA)")
    p.add_argument("--fast", action="store_true",
                   help="about half the time on a CPU: 64 calibration samples, 10 scale candidates instead of 20, "
                        "2048 tokens scoring the MLP's scales (quality cost measured in benchmarks/RESULTS.md, "
                        "issue 30); explicit --n-samples still wins")
    p.add_argument("--no-clip", action="store_true", help="skip the clipping search (grids from each group's min and max)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished layer")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from .pipeline import FAST, QuantizeSettings, quantize_checkpoint

    preset = dict(FAST) if args.fast else {}
    if args.n_samples is not None:
        preset["n_samples"] = args.n_samples
    settings = QuantizeSettings(method=args.method, w_bit=args.w_bit, group_size=args.group_size,
                                seqlen=args.seqlen, calib=args.calib, **preset,
                                calib_images=args.calib_images, device=args.device, clip=not args.no_clip,
                                rounding=args.rounding, matmul=args.matmul,
                                quantize_lm_head=args.quantize_lm_head,
                                quantize_embedding=args.quantize_embedding)
    try:
        summary = quantize_checkpoint(args.src, args.out, settings, resume=args.resume, force=args.force,
                                      progress=not args.quiet)
    except KeyboardInterrupt:
        partial = Path(args.out).expanduser().with_name(Path(args.out).name + ".partial")
        hint = f"finished layers are kept in {partial}; add --resume to continue" if partial.exists() else \
            "nothing was written"
        print(f"\nedge-vlm: interrupted; {hint}", file=sys.stderr)
        return 130
    print(summary.text())
    return 0
