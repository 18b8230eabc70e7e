"""Runtime core vs transformers on the real SmolLM2-135M, side by side in one run.

Measures, for the same chat prompt and greedy decoding: time to first token, decode
tokens/s and the share of the bandwidth floor. Rows: our runtime in fp32 and on 4-bit
copies of the same weights (quantized here in a second with RTN: AWQ checkpoints have the
same layout and speed; with and without a 4-bit lm_head), transformers in fp32, and, if
llama-cpp-python is installed, llama.cpp's own generate loop and ours (`--backend llama.cpp`)
on three GGUF files: the original Q4_1 file, our 4-bit checkpoint exported as Q4_1-AWQ, and
llama.cpp's Q4_K_M of the 16-bit weights. Prints a Markdown table.

    python -m edge_vlm.benchmarks.runtime_vs_transformers [--new-tokens 64] [--threads 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from .bench_e2e import decode_bytes
from .same_cpu_kernels import same_kernels
from .timing import bandwidth_share, copy_bandwidth


def run_engine(engine, tokenizer, prompt_ids, new_tokens, repeat) -> list[tuple]:
    """(ttft, decode tok/s, tokens) of our generate loop over `engine`, after a warm-up run."""
    from edge_vlm import GenerationConfig
    from edge_vlm.generate import AnswerText, GenerationStats, generate
    from edge_vlm.contracts import Prompt

    runs = []
    for _ in range(repeat + 1):  # the first run warms up
        engine.reset()
        stats = GenerationStats()
        answer = AnswerText(tokenizer, set(), [])  # no EOS: every run decodes new_tokens
        list(generate(engine, Prompt([prompt_ids]), GenerationConfig(max_new_tokens=new_tokens, temperature=0),
                      answer, stats=stats))
        runs.append((stats.ttft_s, stats.decode_tokens_per_s, answer.tokens))
    return runs[1:]


def bench_ours(folder, prompt_ids, new_tokens, repeat):
    """Runs after a warm-up, and the bytes of weights one decode step reads."""
    from edge_vlm import load_model
    from edge_vlm.backends.torch_engine import TorchEngine

    model = load_model(folder, device="cpu", progress=False)
    return run_engine(TorchEngine(model.llm, 1024), model.tokenizer, prompt_ids, new_tokens, repeat), \
        decode_bytes(model.llm, 0, 4)


def bench_ours_on_llama_cpp(gguf, folder, prompt_ids, new_tokens, repeat, threads) -> list[tuple] | None:
    """Our loop (sampler, stop handling, streaming) with llama.cpp computing the logits, on `gguf`."""
    try:
        from edge_vlm.backends.llamacpp.engine import LlamaCppEngine
    except ImportError:
        return None
    from edge_vlm.text.tokenizer import Tokenizer

    engine = LlamaCppEngine(gguf, 1024, n_threads=threads)
    try:
        return run_engine(engine, Tokenizer(folder), prompt_ids, new_tokens, repeat)
    finally:
        engine.close()


def bench_ours_int4(folder, prompt_ids, new_tokens, repeat, tmp) -> tuple[list[tuple], str]:
    """Our runtime on 4-bit copies of the model (group 64: SmolLM2's 576 is not a multiple of 128),
    and the folder of the one with the 4-bit lm_head (its GGUF export is timed in llama.cpp too)."""
    from edge_vlm.backends.cpu.timing import cpu_int4_compute_dtype
    from edge_vlm.quantize.pipeline import QuantizeSettings, quantize_checkpoint

    act = str(cpu_int4_compute_dtype()).replace("torch.", "")
    rows = []
    for head in (False, True):
        out = f"{tmp}/int4-head{int(head)}"
        quantize_checkpoint(folder, out, QuantizeSettings(method="rtn", quantize_lm_head=head), progress=False,
                            log=lambda _msg: None)
        runs, nbytes = bench_ours(out, prompt_ids, new_tokens, repeat)
        what = "int4 linears + int4 lm_head" if head else "int4 linears, fp32 lm_head"
        rows.append((f"edge-vlm ({what}; {act} activations)", runs, nbytes))
    return rows, out


def bench_transformers(folder, prompt_ids, new_tokens, repeat):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    runs = []
    with torch.no_grad():
        for _ in range(repeat + 1):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False, min_new_tokens=1)
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                                 eos_token_id=None, pad_token_id=0)
            total = time.perf_counter() - t0
            runs.append((ttft, (new_tokens - 1) / max(total - ttft, 1e-9), out[0, len(prompt_ids):].tolist()))
    return runs[1:]


def gguf_files(folder, int4_folder, tmp):
    """The GGUF files both loops are timed on: SmolLM2's original file, our AWQ-layout checkpoint
    exported as Q4_1 blocks of its own integers, and llama.cpp's Q4_K_M of the 16-bit weights."""
    from .real_model import gguf_path

    yield "original Q4_1 GGUF", gguf_path()
    try:
        from edge_vlm.backends.llamacpp.gguf_export import export_gguf
        from edge_vlm.loading import load_for_export
    except ImportError:
        return
    yield "our int4 checkpoint -> Q4_1-AWQ export", export_gguf(load_for_export(int4_folder), f"{tmp}/awq.gguf", "q4_1-awq",
                                                                 progress=False)
    yield "Q4_K_M export of the 16-bit weights", export_gguf(load_for_export(folder), f"{tmp}/q4km.gguf", "q4_k_m", progress=False)


def bench_llama_cpp(gguf, prompt_ids, new_tokens, repeat, threads):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    same_kernels(gguf)  # the extra-buffer verdict our engine loads this file with
    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, verbose=False)
    runs = []
    for _ in range(repeat + 1):
        llm.reset()
        t0 = time.perf_counter()
        first = None
        n = 0
        for _tok in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            n += 1
            if first is None:
                first = time.perf_counter() - t0
            if n >= new_tokens:
                break
        total = time.perf_counter() - t0
        runs.append((first, (n - 1) / max(total - first, 1e-9), None))
    return runs[1:]


def main(argv=None) -> None:
    from .real_model import smollm2_folder

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = smollm2_folder()
    from edge_vlm.text.tokenizer import Tokenizer

    from edge_vlm.text.templates import ChatTemplate

    tok = Tokenizer(folder)
    template = ChatTemplate(tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token)
    prompt = template.render([{"role": "user", "content": "Write a short story about a robot who learns to paint. "
                                                          "Describe its first painting in detail."}])
    prompt_ids = tok.encode(prompt)
    ours, fp32_bytes = bench_ours(folder, prompt_ids, args.new_tokens, args.repeat)
    rows = [("edge-vlm (fp32, static KV cache)", ours, fp32_bytes),
            ("transformers generate (fp32)", bench_transformers(folder, prompt_ids, args.new_tokens, args.repeat),
             fp32_bytes)]
    with tempfile.TemporaryDirectory() as tmp:
        int4_rows, int4_folder = bench_ours_int4(folder, prompt_ids, args.new_tokens, args.repeat, tmp)
        rows += int4_rows
        pairs = []  # (llama.cpp's own loop, ours) on the same file
        for label, gguf in gguf_files(folder, int4_folder, tmp):
            cpp = bench_llama_cpp(gguf, prompt_ids, args.new_tokens, args.repeat, args.threads)
            if cpp is None:
                break
            ours_cpp = bench_ours_on_llama_cpp(gguf, folder, prompt_ids, args.new_tokens, args.repeat, args.threads)
            size = gguf.stat().st_size  # it reads the 4-bit file, so its own floor is the file size
            rows += [(f"llama.cpp's own loop ({label})", cpp, size), (f"edge-vlm --backend llama.cpp ({label})",
                                                                       ours_cpp, size)]
            pairs.append((label, cpp, ours_cpp))
    base = statistics.median(r[1] for r in rows[1][1])
    bw = copy_bandwidth(torch.device("cpu"), mib=512)
    print(f"SmolLM2-135M-Instruct, CPU, {args.threads} threads, prompt {len(prompt_ids)} tokens, "
          f"{args.new_tokens} new tokens, median of {args.repeat}\n")
    print("| runtime | time to first token | decode tok/s | vs transformers | weights read per token "
          "| of its bandwidth floor |")
    print("|---|---|---|---|---|---|")
    for name, runs, nbytes in rows:
        ttft = statistics.median(r[0] for r in runs)
        tps = statistics.median(r[1] for r in runs)
        print(f"| {name} | {ttft * 1000:.0f} ms | {tps:.1f} | {tps / base:.2f}x | {nbytes / 1e6:.0f} MB "
              f"| {bandwidth_share(nbytes, 1 / tps, bw):.0%} |")
    print(f"\ncopy bandwidth measured in the same run: {bw / 1e9:.1f} GB/s")
    same = rows[0][1][0][2] == rows[1][1][0][2]
    print(f"\ngreedy tokens identical (ours vs transformers): {same}")
    for label, cpp, ours_cpp in pairs:
        tps = [statistics.median(r[1] for r in runs) for runs in (ours_cpp, cpp)]
        ttft = [statistics.median(r[0] for r in runs) for runs in (ours_cpp, cpp)]
        print(f"our loop over llama.cpp vs llama.cpp's own, {label}: decode {tps[0] / tps[1]:.2f}x, "
              f"time to first token {ttft[0] / ttft[1]:.2f}x")


if __name__ == "__main__":
    main()
