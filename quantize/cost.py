"""What one decoder layer's AWQ quantization costs, counted from the shapes: floating-point operations
per step and the precision each runs in, and the time that makes at given rates.

Why counted, not only timed: the estimate a user sees before the first layer (this machine's
measured matmul rates, quantize/matmul_choice.py) and the GPU estimate of benchmarks/real_size.py
come from the same counts, and a timing of one layer can be read against them (which step runs far
below its rate). Counts follow the code of quantize/awq.py and quantize/gptq.py step by step; the
elementwise work of fake quantization is counted in weight elements, not flops.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_vlm.formats.configs import LLMConfig

from .awq import GRAM_STRIP, NO_CLIP, AWQOptions

GPTQ_BLOCK = 128  # gptq_quantize's default block
# elementwise passes over a weight element per fake quantization (scale, group min/max, divide,
# round, shift, clamp, dequantize, unscale, difference): a measured throughput prices them
FAKE_QUANT_PASSES = 12
GPTQ_OPS_PER_COLUMN = 10  # the sweep's small ops per column (round, store, error, rank-1 update, ...)
CLIP_OPS_PER_GROUP = 30   # the clipping search's ops per group of columns (inside the sweep)


@dataclass(frozen=True)
class Step:
    name: str
    amount: float  # flops; element passes for kind "elements"; small sequential ops for kind "ops"
    kind: str      # "forward" (the layer's passes), "search" (scale-search products), "fp32", "fp64",
                   # "elements" (elementwise passes over weights) or "ops" (one column's ops, in sequence)


def _linears(cfg: LLMConfig) -> dict[str, tuple[int, int]]:
    """name -> (out rows N, in features K) of one decoder layer."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
           "self_attn.o_proj": (d, q), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    if cfg.mlp == "gated_silu":
        out["mlp.gate_proj"] = (f, d)
    return out


def _forward_flops(cfg: LLMConfig, tokens: int, seqlen: int) -> float:
    lin = sum(2 * n * k for n, k in _linears(cfg).values()) * tokens
    attn = 2 * 2 * tokens * seqlen * cfg.num_heads * cfg.head_dim / 2  # QK^T and AV, causal half
    return lin + attn


def _gram_flops(tokens: int, k: int) -> float:
    """add_gram_upper's strips: [strip, K - i] products over every token."""
    return sum(2 * tokens * min(GRAM_STRIP, k - i) * (k - i) for i in range(0, k, GRAM_STRIP))


def layer_steps(cfg: LLMConfig, n_samples: int, seqlen: int, opts: AWQOptions) -> list[Step]:
    """The counted steps of `quantize_layer_awq` on n_samples x seqlen calibration tokens."""
    lin = _linears(cfg)
    d, f = cfg.hidden_size, cfg.intermediate_size
    tokens = n_samples * seqlen
    h_tokens = min(tokens, opts.hessian_tokens)
    search_tokens = min(tokens, opts.search_tokens)
    gated = cfg.mlp == "gated_silu"
    firsts = ("mlp.gate_proj", "mlp.up_proj") if gated else ("mlp.up_proj",)
    # one H per input: norm -> q,k,v; attention -> o; norm -> gate,up; activation -> down
    inputs = [(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), d),
              (("self_attn.o_proj",), lin["self_attn.o_proj"][1]), (firsts, d), (("mlp.down_proj",), f)]
    candidates = opts.n_grid + 1  # s = 1 and the grid
    steps = [Step("forward 16-bit", _forward_flops(cfg, tokens, seqlen), "forward")]
    steps.append(Step("H = X^T X", sum(_gram_flops(h_tokens, k) for _, k in inputs), "fp32"))
    if opts.scale_search:
        h_loss = sum(2 * sum(lin[n][0] for n in names) * k * k for names, k in inputs if names != firsts)
        firsts_flops = 2 * search_tokens * sum(lin[n][0] for n in firsts) * d
        mlp = firsts_flops + 2 * search_tokens * f * d  # per candidate: x dW^T, then the change through down_proj
        steps.append(Step("scale search: linear blocks (H)", candidates * h_loss, "search"))
        steps.append(Step("scale search: MLP block (tokens)", candidates * mlp + firsts_flops, "search"))
        steps.append(Step("scale search: fake quantization", candidates * sum(n * k for n, k in lin.values())
                          * FAKE_QUANT_PASSES, "elements"))
    if opts.rounding == "gptq":
        steps.append(Step("GPTQ: factor of H^-1", sum(4 / 3 * k ** 3 for _, k in inputs), "fp64"))
        steps.append(Step("GPTQ: column sweep", sum(2 * n * k * (k + GPTQ_BLOCK) / 2 for n, k in lin.values()),
                          "fp32"))
        sweeps = [k for _, k in inputs]  # one sweep per input: linears reading it are stacked
        groups = sum(k // opts.group_size for k in sweeps) if opts.clip else 0
        steps.append(Step("GPTQ: per-column ops", sum(sweeps) * GPTQ_OPS_PER_COLUMN + groups * CLIP_OPS_PER_GROUP,
                          "ops"))
    if opts.clip:
        ratios = int(opts.max_shrink * opts.clip_grid)
        clipped = [(n, k) for name, (n, k) in lin.items() if name not in NO_CLIP]
        steps.append(Step("clipping search", sum(ratios * 2 * n * k * opts.group_size for n, k in clipped), "fp32"))
        steps.append(Step("clipping search: fake quantization",
                          sum(ratios * n * k for n, k in clipped) * FAKE_QUANT_PASSES, "elements"))
    steps.append(Step("forward quantized", _forward_flops(cfg, tokens, seqlen), "forward"))
    return steps


def step_seconds(step: Step, rates: dict[str, float]) -> float:
    """Seconds of one step at `rates` (per second, by `Step.kind`)."""
    return step.amount / rates[step.kind]


def layer_seconds(steps: list[Step], rates: dict[str, float]) -> float:
    return sum(step_seconds(s, rates) for s in steps)
