"""GPTQ-style rounding: quantize a weight column by column, moving each column's rounding error
onto the columns not yet quantized, weighted by the inverse Hessian H = X^T X of the layer input.

Why: round-to-nearest treats every weight alone; the output error x·(w - Q(w)) depends on how
the input channels correlate, and GPTQ cancels part of it (Frantar et al., 2022). Written here in
the form every loader of ours reads: asymmetric, group-wise (each group's scale and zero point are
fixed from the updated weights when the sweep reaches the group's first column), in the natural
column order (no act-order), so the result is a plain `QuantizedWeight` in the AutoAWQ GEMM grid.
"""

from __future__ import annotations

from typing import Callable

import torch

from .groupwise import QuantizedWeight, group_grid, round_to_grid


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, the factor GPTQ's updates use."""
    h = h.to(torch.float64, copy=True)
    diag = h.diagonal()
    dead = diag <= 0
    diag[dead] = 1.0
    diag += damp * float(diag.mean())
    base, added = float(diag.mean()), 0.0
    for extra in (0.0, 0.1, 1.0):  # a near-singular H (few tokens, dead channels) gets more damping
        try:
            diag += (extra - added) * base  # in place on h's diagonal: no identity matrices
            added = extra
            inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
            return torch.linalg.cholesky(inv, upper=True).float()
        except torch.linalg.LinAlgError:
            continue
    raise RuntimeError("GPTQ: the input Hessian is not positive definite even with damping")


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, group_size: int, bits: int = 4, damp: float = 0.01,
                  block: int = 128,
                  group_range: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None,
                  ) -> QuantizedWeight:
    """w [N, K] -> integers, zero points and fp16 scales, with error compensation under H [K, K].

    `group_range(weights [N, G], first column)` picks each group's [lo, hi] from its weights as
    updated so far (e.g. the clipping search); by default the group's min and max. Rows never mix,
    so linears that read one input (q, k, v) go through one call, stacked, sharing H's factor.

    The sweep runs on w transposed: a column of w is then a contiguous row, and each rank-1 update
    of the block a contiguous BLAS `ger` (column slices of w in place were strided gathers).
    """
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    block = max(group_size, block // group_size * group_size)
    u = _inverse_cholesky(h.to(w.device), damp)
    wt = w.t().float().contiguous()  # [K, N], a copy
    wt[torch.diag(h).to(w.device) <= 0] = 0
    qt = torch.empty(k, n, dtype=torch.uint8, device=w.device)
    scales = torch.empty(k // group_size, n, device=w.device)
    zeros = torch.empty(k // group_size, n, device=w.device)
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        wb, ub = wt[b0:b1], u[b0:b1, b0:b1]  # wb: a view, updated in place
        err = torch.empty(b1 - b0, n, device=w.device)
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:  # the group's grid, from its weights as updated so far
                g = col // group_size
                grp = wb[i:i + group_size]
                lo, hi = (grp.amin(0), grp.amax(0)) if group_range is None else group_range(grp.t(), col)
                scales[g], zeros[g] = group_grid(lo, hi, bits)
                s, z = scales[g], zeros[g]
            qi = round_to_grid(wb[i], s, z, bits)
            qt[col] = qi
            e = torch.div(wb[i] - (qi - z) * s, ub[i, i], out=err[i])
            if i + 1 < b1 - b0:
                wb[i + 1:].addr_(ub[i, i + 1:], e, alpha=-1)
        if b1 < k:
            wt[b1:].addmm_(u[b0:b1, b1:].t(), err, alpha=-1)
    return QuantizedWeight(qt.t().contiguous(), zeros.t().to(torch.uint8).contiguous(),
                           scales.t().to(torch.float16).contiguous())
