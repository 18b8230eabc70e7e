"""What constrained decoding costs on the CPU, side by side in one run, on the real SmolLM2-135M.

Part 1, the grammar libraries (llguidance, xgrammar, outlines-core) on SmolLM2's tokenizer
(vocab 49152): the one-time preparation of the tokenizer, the compile of each grammar (any JSON
object, a camera-event JSON schema with an enum, required fields, a nested object, an array and
numbers, a yes/no choice), and the per-token cost of computing the mask and advancing the matcher
along a fixed valid answer (median and mean over every token of it, several passes).
Part 2, the chosen library (edge_vlm.text.constrained, llguidance) inside our generate loop: decode
ms/token unconstrained vs constrained through our torch engine and the llama.cpp engine, greedy,
the same prompt; and the mask alone per token (mask + advance + applying it to the logits).

    python -m edge_vlm.benchmarks.constrained_overhead [--passes 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from edge_vlm import GenerationConfig, load_model
from edge_vlm.backends.llamacpp.engine import LlamaCppEngine
from edge_vlm.text.constrained import compile_constraint
from edge_vlm.generate import AnswerText, GenerationStats, generate
from edge_vlm.contracts import Prompt
from edge_vlm.backends.torch_engine import TorchEngine
from edge_vlm.text.sampling import Sampler, SamplingParams
from edge_vlm.text.tokenizer import Tokenizer

from .real_model import gguf_path, smollm2_folder

EVENT = {"type": "object", "properties": {
    "label": {"type": "string", "enum": ["person", "car", "dog", "cat", "none"]},
    "count": {"type": "integer", "minimum": 0, "maximum": 20},
    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    "where": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"]},
    "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["label", "count", "confidence", "where", "tags"], "additionalProperties": False}
EVENT_ANSWER = json.dumps({"label": "dog", "count": 2, "confidence": 0.75, "where": {"x": 120, "y": 64},
                           "tags": ["brown dog", "on the grass", "running fast"]}, separators=(",", ":"))
OBJECT_ANSWER = json.dumps({"animal": "dog", "legs": 4, "colours": ["brown", "white"], "size": {"cm": 60}},
                           separators=(",", ":"))
GRAMMARS = {"json object": ({"type": "object"}, OBJECT_ANSWER), "event schema": (EVENT, EVENT_ANSWER),
            "choice yes/no": (["yes", "no"], "yes")}


def seconds(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def walk(new_matcher, mask_and_advance, ids, passes):
    """Per-token seconds of mask + advance along `ids`, over `passes` fresh matchers."""
    times = []
    for _ in range(passes):
        m = new_matcher()
        for t in ids:
            s = time.perf_counter()
            mask_and_advance(m, t)
            times.append(time.perf_counter() - s)
    return times


def llguidance_row(tok, passes):
    import llguidance
    import llguidance.torch as lgt

    lt, prep = seconds(lambda: llguidance.LLTokenizer(tok.hf.to_str(), eos_token=[2]))
    compact = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    out = {"prep": prep}
    for name, (spec, answer) in GRAMMARS.items():
        g = (llguidance.grammar_from("choice", json.dumps(spec)) if isinstance(spec, list)
             else llguidance.LLMatcher.grammar_from_json_schema(spec, overrides=compact))
        m, comp = seconds(lambda: llguidance.LLMatcher(lt, g, log_level=0))
        assert not m.is_error(), m.get_error()
        bits = lgt.allocate_token_bitmask(1, lt.vocab_size)

        def step(m, t):
            lgt.fill_next_token_bitmask(m, bits)
            assert m.consume_token(t)
        out[name] = (comp, walk(lambda: llguidance.LLMatcher(lt, g, log_level=0), step, tok.encode(answer), passes))
    return out


def xgrammar_row(tok, passes):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tok.folder / "tokenizer.json"), eos_token=tok.eos_token)
    info, prep = seconds(lambda: xgr.TokenizerInfo.from_huggingface(hf, vocab_size=49152, stop_token_ids=[2]))
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    out = {"prep": prep}
    for name, (spec, answer) in GRAMMARS.items():
        if isinstance(spec, list):
            fn = lambda: compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in spec))  # noqa: E731
        else:
            fn = lambda: compiler.compile_json_schema(json.dumps(spec), any_whitespace=False,  # noqa: E731
                                                      separators=(",", ":"))
        cg, comp = seconds(fn)
        bits = xgr.allocate_token_bitmask(1, 49152)

        def step(m, t):
            m.fill_next_token_bitmask(bits)
            assert m.accept_token(t)
        out[name] = (comp, walk(lambda: xgr.GrammarMatcher(cg), step, tok.encode(answer), passes))
    return out


def outlines_row(tok, passes):
    import outlines_core as oc
    from outlines_core.json_schema import build_regex_from_schema

    def vocabulary():  # GPT-2 byte-level pieces back to their bytes
        keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
        chars, n = keep[:], 0
        for b in range(256):
            if b not in keep:
                keep.append(b)
                chars.append(256 + n)
                n += 1
        byte_of = {chr(c): b for b, c in zip(keep, chars)}
        table = {}
        for piece, i in tok.hf.get_vocab().items():
            if i not in tok.special_ids:
                table.setdefault(bytes(byte_of[c] for c in piece), []).append(i)
        return oc.Vocabulary(2, table)
    vocab, prep = seconds(vocabulary)
    out = {"prep": prep}
    for name, (spec, answer) in GRAMMARS.items():
        # a regex: choices as alternatives; "any object" only as outlines' bounded-depth regex of {"type": "object"}
        rx = "(" + "|".join(spec) + ")" if isinstance(spec, list) else build_regex_from_schema(json.dumps(spec))
        index, comp = seconds(lambda: oc.Index(rx, vocab))
        bits = torch.full((1, (49152 + 31) // 32), -1, dtype=torch.int32)

        def step(g, t):
            g.write_mask_into(bits.data_ptr(), bits.numel(), 4)
            g.advance(t, return_tokens=False)
        try:
            out[name] = (comp, walk(lambda: oc.Guide(index), step, tok.encode(answer), passes))
        except Exception as e:  # noqa: BLE001 - a grammar it cannot follow is a result too
            out[name] = (comp, f"fails: {type(e).__name__}")
    return out


def library_table(tok, passes):
    print(f"\n## Grammar libraries on SmolLM2's tokenizer (vocab {tok.hf.get_vocab_size()}), {passes} passes")
    print("| library | licence | tokenizer prep s | grammar | compile ms | mask+advance µs/token median | mean |")
    print("|---|---|---|---|---|---|---|")
    for lib, licence, fn in [("llguidance", "MIT", llguidance_row), ("xgrammar", "Apache-2.0", xgrammar_row),
                             ("outlines-core", "Apache-2.0", outlines_row)]:
        try:
            row = fn(tok, passes)
        except ImportError as e:
            print(f"| {lib} | {licence} | not installed ({e.name}) | | | | |")
            continue
        for name in GRAMMARS:
            comp, times = row[name]
            if isinstance(times, str):
                print(f"| {lib} | {licence} | {row['prep']:.2f} | {name} | {comp * 1e3:.1f} | {times} | |")
            else:
                print(f"| {lib} | {licence} | {row['prep']:.2f} | {name} | {comp * 1e3:.1f} | "
                      f"{statistics.median(times) * 1e6:.1f} | {statistics.mean(times) * 1e6:.1f} |")


def loop_table(tokens, repeats):
    folder = smollm2_folder()
    model = load_model(folder, device="cpu", progress=False)
    ids = model.tokenizer.encode(model.template.render([{"role": "user", "content": "A dog runs across a park. "
                                                                                    "Report it as JSON."}]))
    engines = {"torch": TorchEngine(model.llm, 512), "llama.cpp": LlamaCppEngine(gguf_path(), 512)}
    print(f"\n## Inside our generate loop (edge_vlm.text.constrained = llguidance), greedy, {tokens} new tokens max, "
          f"median of {repeats}")
    print("| engine | constraint | new tokens | decode ms/token | stop reason |")
    print("|---|---|---|---|---|")
    for name, engine in engines.items():
        for label, constraint in [("none", None), ("json object", {"type": "json_object"}), ("event schema", EVENT)]:
            runs = []
            for _ in range(repeats + 1):  # the first run warms up (and compiles the grammar once)
                engine.reset()
                stats = GenerationStats()
                answer = AnswerText(model.tokenizer, model.eos_token_ids, model.template.stop_strings)
                gen = GenerationConfig(max_new_tokens=tokens, temperature=0, constraint=constraint)
                for _piece in generate(engine, Prompt([ids]), gen, answer, stats=stats):
                    pass
                runs.append(stats)
            ms = statistics.median(1e3 / s.decode_tokens_per_s for s in runs[1:])
            print(f"| {name} | {label} | {runs[-1].new_tokens} | {ms:.2f} | {runs[-1].stop_reason} |")
    # the mask alone, as the loop does it per token: compute, apply in the sampler, advance
    answer = model.tokenizer.encode(EVENT_ANSWER)
    logits = torch.randn(model.llm.cfg.vocab_size)
    sampler = Sampler(SamplingParams(0.0))
    plain = statistics.median(walk(lambda: None, lambda m, t: sampler(logits), answer, repeats * 4))

    def masked(m, t):
        sampler(logits, None, m.allowed(logits.numel()))
        m.advance(t)
    times = walk(lambda: compile_constraint(EVENT, model.tokenizer, model.eos_token_ids), masked, answer, repeats * 4)
    print(f"\nper token, sampler alone: greedy {plain * 1e6:.0f} µs; with the event-schema mask (compute + apply + "
          f"advance): median {statistics.median(times) * 1e6:.0f} µs, mean {statistics.mean(times) * 1e6:.0f} µs")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passes", type=int, default=5, help="fresh matchers walked per grammar (part 1)")
    p.add_argument("--tokens", type=int, default=64, help="max new tokens per answer (part 2)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    library_table(Tokenizer(smollm2_folder()), args.passes)
    loop_table(args.tokens, args.repeats)


if __name__ == "__main__":
    main()
