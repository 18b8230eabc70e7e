"""Activation-aware weight quantization (AWQ) of one decoder layer, and the RTN baseline.

Why it works: a few input channels carry much larger activations than the rest; their weights
matter most, yet round-to-nearest spends the same precision on them. Multiplying those weight
columns by s > 1 (and dividing the activations by s, folded into the op before) shrinks their
relative rounding error. The scale per channel is s = mean|x|^a / mean|w|^(1-a), with a picked
from a grid by the error of the block's output on calibration data. Then each group's range is
clipped (shrunk) where that lowers the output error, and the weights are rounded.

The losses of linear blocks are read from the input's second moment H = X^T X (|x·dW|^2 summed
over tokens = tr(dW H dW^T)), gathered over up to `hessian_tokens` calibration tokens: a scale or
clipping choice is then scored on many more tokens than a subsample could hold, which is what
keeps it from fitting the calibration text (the clipping search used to see 512 tokens). Only
the MLP block, whose nonlinearity H cannot express, is scored on `search_tokens` real tokens.
Rounding (default `rounding="gptq"`) is GPTQ's error compensation (quantize/gptq.py) under the same
H, each group's grid chosen by that clipping search on its weights as updated so far: on held-out
text it recovered more than plain rounding after clipping (`rounding="rtn"`, the original AWQ)
and more than GPTQ on min-max grids (benchmarks/RESULTS.md).

Folding is exact in 16-bit: norm -> q,k,v; v -> o (per KV head, so it also works with grouped
query attention); post-attention norm -> gate,up; up -> down (through Nemotron's squared ReLU
the up rows take sqrt(s), since relu(u/t)^2 = relu(u)^2 / t^2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from edge_vlm.formats.configs import LLMConfig
from edge_vlm.models.kv_cache import StaticKVCache
from edge_vlm.models.llm import DecoderLayer, LayerNorm1P
from edge_vlm.models.rotary import rope_tables

from .groupwise import QuantizedWeight, fake_quantize, quantize_weight
from .gptq import gptq_quantize

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")  # q·k products amplify clipping errors


@dataclass
class AWQOptions:
    group_size: int = 128
    bits: int = 4
    n_grid: int = 20           # scale exponents a = 0, 1/20, ..., 19/20
    duo_scaling: bool = True   # divide by the weight term mean|w|^(1-a)
    clip: bool = True
    clip_grid: int = 20        # shrink ratios 1, 0.95, ... down to 1 - max_shrink
    max_shrink: float = 0.5
    search_tokens: int = 4096  # calibration tokens kept for the scale search loss (MLP block)
    clip_tokens: int = 512     # of which used for the clipping search when hessian=False
    batch_tokens: int = 4096   # tokens per forward pass through the layer
    hessian: bool = True       # linear losses and clipping from H = X^T X (else from the token sample)
    hessian_tokens: int = 65536  # calibration tokens summed into H (the default 128 x 512: all)
    clip_damp: float = 0.0     # clipping loss on H + damp * mean(diag H) * I: pulls the choice toward plain rounding
    scale_search: bool = True  # False: no AWQ scales (RTN or GPTQ alone)
    rounding: str = "gptq"     # "gptq" (error compensation under H, grids from the clipping search) or "rtn"
    gptq_damp: float = 0.01


def layer_linears(layer: DecoderLayer) -> dict[str, nn.Linear]:
    return {n: layer.get_submodule(n) for n in LINEARS if _has(layer, n)}


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


class LayerRunner:
    """Runs one decoder layer on full calibration sequences (fresh cache, causal mask)."""

    def __init__(self, cfg: LLMConfig, seqlen: int, device):
        self.cfg, self.seqlen, self.device = cfg, seqlen, device
        self.cos, self.sin = rope_tables(cfg, seqlen, device)
        pos = torch.arange(seqlen, device=device)
        self.mask = pos[None, :] <= pos[:, None]

    @torch.no_grad()
    def __call__(self, layer: DecoderLayer, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        cache = StaticKVCache(1, self.cfg.num_kv_heads, t, self.cfg.head_dim, x.dtype, x.device, batch=b)
        return layer(x, self.cos[:t], self.sin[:t], cache, 0, self.mask[:t, :t])


def _batches(n: int, seqlen: int, batch_tokens: int):
    bs = max(1, batch_tokens // seqlen)
    for i in range(0, n, bs):
        yield slice(i, min(n, i + bs))


class _Capture:
    """Forward-hook state for one linear's input: running mean|x|, a token subsample, and the
    second moment H = sum x^T x over a (larger) subsample."""

    def __init__(self, per_batch: int, h_per_batch: int, seed: int):
        self.abs_sum, self.count, self.rows = None, 0, []
        self.h_sum, self.h_count = None, 0
        self.per_batch, self.h_per_batch, self.gen = per_batch, h_per_batch, torch.Generator().manual_seed(seed)

    def __call__(self, module, args, output):
        x = args[0].reshape(-1, args[0].shape[-1])
        s = x.float().abs().sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += x.shape[0]
        perm = torch.randperm(x.shape[0], generator=self.gen).to(x.device)
        self.rows.append(x[perm[: self.per_batch]].float())
        if self.h_per_batch:
            xh = x[perm[: self.h_per_batch]].float()
            h = xh.t() @ xh
            self.h_sum = h if self.h_sum is None else self.h_sum + h
            self.h_count += xh.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)

    @property
    def hessian(self) -> torch.Tensor | None:
        """Mean x^T x per token (None when not gathered)."""
        return None if self.h_sum is None else self.h_sum / max(self.h_count, 1)


def _capture_inputs(layer, runner, x_all, groups: list[ScaleGroup], opts: AWQOptions):
    """Run the 16-bit layer; return its outputs and the input seen by each linear group."""
    n, t, _ = x_all.shape
    n_batches = len(list(_batches(n, t, opts.batch_tokens)))
    per_batch = -(-opts.search_tokens // n_batches)
    h_per_batch = -(-opts.hessian_tokens // n_batches) if opts.hessian or opts.rounding == "gptq" else 0
    caps = [_Capture(per_batch, h_per_batch, seed=i) for i in range(len(groups))]
    hooks = [layer.get_submodule(g.names[0]).register_forward_hook(c) for g, c in zip(groups, caps)]
    try:
        out = _run_all(layer, runner, x_all, opts)
    finally:
        for h in hooks:
            h.remove()
    return out, caps


def _weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per input channel: mean over output rows of |w| relative to its group's max |w|."""
    w = torch.cat(weights).float()
    g = w.view(w.shape[0], -1, group_size).abs()
    g = g / g.amax(-1, keepdim=True).clamp(min=1e-8)
    return g.view(w.shape).mean(0)


def search_scales(x: torch.Tensor, x_mean: torch.Tensor, weights: list[torch.Tensor],
                  block: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor], opts: AWQOptions,
                  tie: Callable[[torch.Tensor], torch.Tensor] = lambda v: v,
                  h: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float]:
    """The per-input-channel scale s minimising |block(x, Q(W*s)/s) - block(x, W)|^2.

    With `h` (a linear block's mean x^T x) the loss is tr(dW h dW^T) / rows, the same mean squared
    output error taken over every token that went into h. Returns (s, best loss, loss with s = 1,
    i.e. plain rounding). `tie` averages statistics over channels that must share one scale (GQA
    heads reading the same value channels).
    """
    ws = [w.float() for w in weights]
    with torch.no_grad():
        ref = block(x, ws) if h is None else None
        x_stat = tie(x_mean.float()).clamp(min=1e-8)
        w_stat = tie(_weight_mean(ws, opts.group_size)).clamp(min=1e-8)
        rows = sum(w.shape[0] for w in ws)

        def loss_of(s):
            q = [fake_quantize(w * s, opts.group_size, opts.bits) / s for w in ws]
            if h is not None:
                return float(sum(((qi - w) @ h * (qi - w)).sum() for qi, w in zip(q, ws)) / rows)
            return float((block(x, q) - ref).pow(2).mean())

        ones = torch.ones_like(x_stat)
        best_s, best = ones, loss_of(ones)
        rtn = best
        for i in range(opts.n_grid):
            a = i / opts.n_grid
            s = x_stat.pow(a) / w_stat.pow(1 - a) if opts.duo_scaling else x_stat.pow(a)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            loss = loss_of(s)
            if loss < best:
                best, best_s = loss, s
    return best_s, best, rtn


def search_clip_hessian(w: torch.Tensor, h: torch.Tensor, opts: AWQOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) range [lo, hi] minimising dw_g H_gg dw_g^T, the group's output error over every
    token in H (its diagonal blocks); `clip_damp` adds a weight-space term that favours no clipping."""
    g = opts.group_size
    w = w.float()
    n, k = w.shape
    hb = torch.stack([h[i:i + g, i:i + g] for i in range(0, k, g)]).float()  # [groups, G, G]
    if opts.clip_damp:
        diag = hb.diagonal(dim1=1, dim2=2).mean(-1)
        hb = hb + opts.clip_damp * diag[:, None, None] * torch.eye(g, device=w.device)
    wg = w.view(n, k // g, g)
    lo_all, hi_all = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    best_lo, best_hi = lo_all.clone(), hi_all.clone()
    best_err = torch.full((n, k // g), float("inf"), device=w.device)
    with torch.no_grad():
        for i in range(int(opts.max_shrink * opts.clip_grid)):
            ratio = 1 - i / opts.clip_grid
            lo, hi = lo_all * ratio, hi_all * ratio
            d = (fake_quantize(w, g, opts.bits, lo, hi) - w).view(n, k // g, g)
            err = torch.einsum("ngi,gij,ngj->ng", d, hb, d)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


def _clipped_range(h: torch.Tensor, opts: AWQOptions):
    """GPTQ's per-group grid from the clipping search on the group's (updated) weights and H block."""
    g = opts.group_size

    def group_range(grp: torch.Tensor, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = search_clip_hessian(grp, h[col:col + g, col:col + g], opts)
        return lo[:, 0], hi[:, 0]
    return group_range


def search_clip(w: torch.Tensor, x: torch.Tensor, opts: AWQOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) range [lo, hi] minimising the group's output error |x_g·(w_g - Q(w_g))|^2 on
    the first `clip_tokens` sampled tokens (the original AWQ search; `hessian=False`)."""
    g = opts.group_size
    w = w.float()
    n, k = w.shape
    xg = x[: opts.clip_tokens].float().view(-1, k // g, g)  # [T, groups, G]
    wg = w.view(n, k // g, g)
    lo_all, hi_all = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    best_lo, best_hi = lo_all.clone(), hi_all.clone()
    rows = max(1, (1 << 24) // max(1, (k // g) * xg.shape[0]))  # bound the [rows, groups, T] buffers
    with torch.no_grad():
        for r0 in range(0, n, rows):
            sl = slice(r0, min(n, r0 + rows))
            ref = torch.einsum("tgc,ngc->ngt", xg, wg[sl])
            best_err = torch.full(ref.shape[:2], float("inf"), device=w.device)
            for i in range(int(opts.max_shrink * opts.clip_grid)):
                ratio = 1 - i / opts.clip_grid
                lo, hi = lo_all[sl] * ratio, hi_all[sl] * ratio
                q = fake_quantize(w[sl], g, opts.bits, lo, hi).view(-1, k // g, g)
                err = (torch.einsum("tgc,ngc->ngt", xg, q) - ref).pow(2).mean(-1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_lo[sl] = torch.where(better, lo, best_lo[sl])
                best_hi[sl] = torch.where(better, hi, best_hi[sl])
    return best_lo, best_hi


# ------------------------------------------------------------------ folding scales into weights

def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def fold_into_norm(norm: nn.Module, s: torch.Tensor) -> None:
    """norm(x) / s: RMSNorm scales its weight; LayerNorm1P's effective weight is (w + 1)."""
    if isinstance(norm, LayerNorm1P):
        _set(norm.weight, (norm.weight.float() + 1) / s - 1)
        _set(norm.bias, norm.bias.float() / s)
    else:
        _set(norm.weight, norm.weight.float() / s)


def fold_into_linear_rows(linear: nn.Linear, s: torch.Tensor) -> None:
    """linear(x) / s: divide output rows (and bias) by s."""
    _set(linear.weight, linear.weight.float() / s[:, None])
    if linear.bias is not None:
        _set(linear.bias, linear.bias.float() / s)


def scale_columns(linears: list[nn.Linear], s: torch.Tensor) -> None:
    for lin in linears:
        _set(lin.weight, lin.weight.float() * s[None, :])


# ------------------------------------------------------------------ one layer

@dataclass
class LayerResult:
    weights: dict[str, QuantizedWeight]  # linear name -> integers, zeros, scales
    loss: float                          # |out_q - out_fp|^2 / |out_fp - x|^2 over the calibration set
    rtn_search_loss: float = 0.0         # sum over blocks of the search loss with s = 1
    awq_search_loss: float = 0.0         # ... with the chosen scales


def gqa_tie(cfg: LLMConfig):
    """Average over the query heads that read one value channel: they must share its scale."""
    rep, hd = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim

    def tie(v: torch.Tensor) -> torch.Tensor:
        return v.view(cfg.num_kv_heads, rep, hd).mean(1, keepdim=True).expand(-1, rep, -1).reshape(-1)
    return tie


@dataclass
class ScaleGroup:
    """Linears reading one input: scaled together by s, with 1/s folded into the op producing that input."""

    names: tuple[str, ...]  # the linears (the first one's input is captured)
    block: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]  # what the scale search scores
    fold: Callable[[torch.Tensor], None]  # divide the producing op's output by s
    tie: Callable[[torch.Tensor], torch.Tensor] = lambda v: v
    linear: bool = True  # the block is the linears themselves: its loss can be read from H


def _linear_block(x, ws):
    return torch.cat([x @ w.t() for w in ws], dim=-1)


def _mlp_block(mlp):
    """The whole MLP as a function of its first linears' weights: the nonlinearity matters."""
    down_w = mlp.down_proj.weight.float()
    up_b = mlp.up_proj.bias.float() if mlp.up_proj.bias is not None else None
    if mlp.gated:
        gate_b = mlp.gate_proj.bias.float() if mlp.gate_proj.bias is not None else None

        def block(x, ws):
            g, u = x @ ws[0].t(), x @ ws[1].t()
            if gate_b is not None:
                g, u = g + gate_b, u + up_b
            return (F.silu(g) * u) @ down_w.t()
        return block

    def block(x, ws):
        u = x @ ws[0].t()
        if up_b is not None:
            u = u + up_b
        return F.relu(u).square() @ down_w.t()
    return block


def scale_groups(layer: DecoderLayer, cfg: LLMConfig) -> list[ScaleGroup]:
    """The four places a scale folds exactly: norm -> q,k,v; v -> o; norm -> gate,up; up -> down."""
    attn, mlp = layer.self_attn, layer.mlp

    def v_rows(s):  # one scale per value channel, shared by the query heads that read it
        fold_into_linear_rows(attn.v_proj, s.view(cfg.num_kv_heads, -1, cfg.head_dim)[:, 0].reshape(-1))

    firsts = ("mlp.gate_proj", "mlp.up_proj") if mlp.gated else ("mlp.up_proj",)
    return [
        ScaleGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), _linear_block,
                   lambda s: fold_into_norm(layer.input_layernorm, s)),
        ScaleGroup(("self_attn.o_proj",), _linear_block, v_rows, gqa_tie(cfg)),
        ScaleGroup(firsts, _mlp_block(mlp), lambda s: fold_into_norm(layer.post_attention_layernorm, s),
                   linear=False),
        # through relu^2 the up rows take sqrt(s)
        ScaleGroup(("mlp.down_proj",), _linear_block,
                   lambda s: fold_into_linear_rows(mlp.up_proj, s if mlp.gated else s.sqrt())),
    ]


@dataclass
class InputStats:
    """What the rounding of one linear needs about its (scaled) input: a token sample and H."""

    sample: torch.Tensor
    hessian: torch.Tensor | None


def apply_scales(layer: DecoderLayer, group: ScaleGroup, cap: _Capture, opts: AWQOptions):
    """Search the group's scale, fold it in; return (the group's input statistics, now of x / s, best, rtn loss)."""
    linears = [layer.get_submodule(n) for n in group.names]
    h = cap.hessian
    if not opts.scale_search:
        return InputStats(cap.sample, h), 0.0, 0.0
    s, best, rtn = search_scales(cap.sample, cap.mean, [m.weight for m in linears], group.block, opts, group.tie,
                                 h if opts.hessian and group.linear else None)
    group.fold(s)
    scale_columns(linears, s)
    return InputStats(cap.sample / s, None if h is None else h / (s[:, None] * s[None, :])), best, rtn


def _quantize_linears(layer: DecoderLayer, inputs: dict[str, InputStats] | None,
                      opts: AWQOptions) -> dict[str, QuantizedWeight]:
    """Round every linear (after the clipping search, or by GPTQ, where `inputs` are given); the layer
    keeps the dequantized weights, so its outputs are those of the quantized model."""
    weights = {}
    for name, lin in layer_linears(layer).items():
        lo = hi = None
        stats = inputs[name] if inputs is not None else None
        clip = stats is not None and opts.clip and name not in NO_CLIP
        if stats is not None and opts.rounding == "gptq":
            qw = gptq_quantize(lin.weight, stats.hessian, opts.group_size, opts.bits, opts.gptq_damp,
                               group_range=_clipped_range(stats.hessian, opts) if clip else None)
        else:
            if clip:
                if opts.hessian:
                    lo, hi = search_clip_hessian(lin.weight, stats.hessian, opts)
                else:
                    lo, hi = search_clip(lin.weight, stats.sample, opts)
            qw = quantize_weight(lin.weight, opts.group_size, opts.bits, lo, hi)
        _set(lin.weight, qw.dequantize(torch.float32))
        weights[name] = qw
    return weights


def quantize_layer_awq(layer: DecoderLayer, cfg: LLMConfig, x_all: torch.Tensor, runner: LayerRunner,
                       opts: AWQOptions) -> tuple[LayerResult, torch.Tensor]:
    """AWQ one layer in place (scales folded, weights replaced by their dequantized values).

    Returns the result and the layer's outputs with quantized weights (the next layer's input).
    """
    groups = scale_groups(layer, cfg)
    fp_out, caps = _capture_inputs(layer, runner, x_all, groups, opts)
    inputs, awq_total, rtn_total = {}, 0.0, 0.0
    for group, cap in zip(groups, caps):
        x, best, rtn = apply_scales(layer, group, cap, opts)
        inputs.update(dict.fromkeys(group.names, x))
        awq_total, rtn_total = awq_total + best, rtn_total + rtn
    weights = _quantize_linears(layer, inputs, opts)
    out = _run_all(layer, runner, x_all, opts)
    return LayerResult(weights, _relative_error(out, fp_out, x_all), rtn_total, awq_total), out


def quantize_layer_rtn(layer: DecoderLayer, opts: AWQOptions) -> LayerResult:
    """Round-to-nearest, no calibration: the baseline AWQ is measured against."""
    return LayerResult(_quantize_linears(layer, None, opts), float("nan"))


def _run_all(layer, runner, x_all, opts) -> torch.Tensor:
    out = torch.empty_like(x_all)
    for sl in _batches(x_all.shape[0], x_all.shape[1], opts.batch_tokens):
        out[sl] = runner(layer, x_all[sl])
    return out


def _relative_error(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor) -> float:
    """Error of the layer's update (out - x) relative to the 16-bit update: scale-free across layers."""
    num = (out.float() - ref.float()).pow(2).sum()
    den = (ref.float() - x.float()).pow(2).sum().clamp(min=1e-12)
    return float(num / den)
