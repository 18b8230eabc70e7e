"""What decoding several conversations together buys: tokens/s of N slots of one llama.cpp
context (`BatchedContext`, what `edge-vlm serve --parallel N` runs on) against one slot, in
the same run, on the real SmolLM2-135M GGUF files.

Each slot is driven from its own thread exactly as the server's lanes drive it (prefill a chat
prompt, then greedy steps); a step of every slot is one `llama_decode`. Two ways: the lanes
draw their tokens themselves from the logits each step hands them ("lanes sample", the old
path), and the decode thread draws every lane's token and feeds it into the next decode at once
("decode thread draws", `SlotEngine.plan`, what the server runs now). Reported: total tokens/s,
per-stream tokens/s, the total's ratio to one slot, and its ratio to the ceiling: `llama_decode`
of the same N-row batches called back to back from one thread, no sampling and no threads (what
llama.cpp's kernels give batching on this CPU). The issue's target: "decode thread draws" at 4
slots >= 90% of the ceiling at 4.

    python -m edge_vlm.benchmarks.batched_decode [--slots 1,2,4,8] [--steps 64]
"""

from __future__ import annotations

import argparse
import os
import threading
import time

from edge_vlm.backends.llamacpp.batched import BatchedContext
from edge_vlm.contracts import Prompt
from edge_vlm.generate import GenerationConfig
from edge_vlm.text.sampling import Sampler, SamplingParams

from .real_model import gguf_path, smollm2_folder

PROMPT = "<|im_start|>user\nTell me a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"


def run(path, slots: int, steps: int, ids: list[int], drawn: bool = True) -> float:
    """Total decode tokens/s of `slots` streams of `steps` greedy tokens each (prefill not timed);
    `drawn`: the decode thread draws the tokens (the server's path), else each stream's thread."""
    ctx = BatchedContext(path, slots, max_context=len(ids) + steps + 8)
    ready = threading.Barrier(slots + 1)
    spans = [0.0] * slots

    def stream(i):
        engine = ctx.engines[i]
        sampler = Sampler(SamplingParams(temperature=0))  # greedy; hands on a token drawn in the decode thread
        if drawn:
            engine.plan(GenerationConfig(temperature=0, max_new_tokens=steps + 1), eos_ids=())
        logits = engine.prefill(Prompt([ids]))
        first = sampler(logits)
        engine.idle()
        ready.wait()
        t0 = time.perf_counter()
        token = first
        for _ in range(steps):
            token = sampler(engine.step(token))
        spans[i] = time.perf_counter() - t0
        engine.idle()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(slots)]
    for t in threads:
        t.start()
    ready.wait()
    for t in threads:
        t.join()
    ctx.close()
    return slots * steps / max(spans)


def raw_rate(path, slots: int, steps: int, ids: list[int]) -> float:
    """Tokens/s of `steps` decodes of one token per sequence, back to back from this thread."""
    from edge_vlm.backends.llamacpp.engine import LlamaContext

    llama = LlamaContext(path, len(ids) + steps + 8 + 2, slots)

    def decode(rows):  # (token, position, sequence)
        b = llama.tokens
        for k, (tok, pos, seq) in enumerate(rows):
            b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = tok, pos, 1, 1
            b.seq_id[k][0] = seq
        b.n_tokens = len(rows)
        llama.decode(b)

    for seq in range(slots):
        decode([(t, i, seq) for i, t in enumerate(ids)])
    for k in range(2):  # warm-up: llama.cpp sizes its compute graph for the N-row batch on the first
        decode([(ids[k], len(ids) + k, seq) for seq in range(slots)])
    t0 = time.perf_counter()
    for k in range(steps):
        decode([(ids[k % len(ids)], len(ids) + 2 + k, seq) for seq in range(slots)])
    rate = slots * steps / (time.perf_counter() - t0)
    llama.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(smollm2_folder() / "tokenizer.json")).encode(PROMPT, add_special_tokens=False).ids
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    q8 = Path(tempfile.mkdtemp(prefix="batched-")) / "smollm2-q8_0.gguf"
    subprocess.run([sys.executable, "-m", "edge_vlm.cli", "export", "gguf", str(smollm2_folder()), str(q8),
                    "--outtype", "q8_0", "--no-progress"], check=True, cwd=tempfile.gettempdir())
    files = [("Q4_1 (the original file)", gguf_path()), ("Q8_0 (our export of its fp16 weights)", q8)]
    slots = sorted({1, *(int(s) for s in args.slots.split(","))})
    print(f"SmolLM2-135M-Instruct, {args.steps} greedy steps per stream, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the start\n")
    print("| file | slots | tokens drawn by | total tok/s | per stream tok/s | total vs 1 slot | "
          "llama_decode alone: tok/s | vs 1 | total vs llama_decode alone |\n|---|---|---|---|---|---|---|---|---|")
    for name, path in files:
        base, raw_base = {}, None
        for n in slots:
            raw = raw_rate(path, n, args.steps, ids)
            raw_base = raw_base or raw
            for drawn, how in ((False, "lanes sample"), (True, "decode thread draws")):
                run(path, n, 8, ids, drawn)  # warm-up
                tok_s = run(path, n, args.steps, ids, drawn)
                base.setdefault(drawn, tok_s)
                print(f"| {name} | {n} | {how} | {tok_s:.1f} | {tok_s / n:.1f} | {tok_s / base[drawn]:.2f}x | "
                      f"{raw:.1f} | {raw / raw_base:.2f}x | {tok_s / raw:.0%} |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
