"""Symmetric int8 with one scale per row: the number format of the int8 KV cache, the int8 token
embeddings and the int8 vision-tower weights (`Int8Linear`, `load_model(vision_int8=True)`).

A module of its own so the KV cache can use it without importing the int4 layer module.
"""

from __future__ import annotations

import torch


def quantize_int8_rows(x: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., D] float -> (int8 [..., D], scales [...] in `scale_dtype`): symmetric per row (last dim).

    scale = max|row| / 127, rounded to `scale_dtype` before the integers are computed (they are
    exact for the scale as stored); integers rounded half away from zero, the rule the Triton
    KV-cache write uses too. Error per entry: at most half a step, max|row| / 254. Used for int8
    token embeddings (fp16 scales) and the int8 KV cache (fp32 scales).
    """
    x = x.float()
    scale = (x.abs().amax(dim=-1).clamp(min=1e-8) / 127).to(scale_dtype)
    y = x / scale.float()[..., None]
    q = torch.sign(y) * torch.floor(y.abs() + 0.5)
    return q.clamp(-127, 127).to(torch.int8), scale


def dequantize_int8_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()[..., None]).to(dtype)


class Int8Linear(torch.nn.Module):
    """A Linear whose weight is int8 with one scale per output row: weight-only, for big vision
    towers (InternViT-6B: 5.9 B parameters, 11.8 GB in fp16, 5.9 GB so). The activations stay in
    the model's dtype; each call dequantizes the weight (one matrix at a time, transient) and runs
    the plain matmul. Error per weight: at most half a step, max|row| / 254."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, dtype=dtype, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_int8_rows(self.qweight, self.scales, x.dtype)
        return torch.nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def use_int8_linears(module: torch.nn.Module) -> list[str]:
    """Swap every nn.Linear inside `module` for an Int8Linear of its shape (on the module's device:
    meta, before the weights load); returns their names."""
    names = []
    for name, m in list(module.named_modules()):
        if isinstance(m, torch.nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child,
                    Int8Linear(m.in_features, m.out_features, m.bias is not None, m.weight.device, m.weight.dtype))
            names.append(name)
    return names


def int8_weight_recipes(recipes: dict, linears: list[str], scale_dtype: torch.dtype) -> dict:
    """Tensor recipes (name -> fetch -> tensor, as the loader's DerivedStore takes them) with each
    `linear.weight` replaced by `linear.qweight` and `linear.scales`, quantized as each is read: the
    16-bit weight of one Linear is in memory at a time, never the whole tower."""
    out = dict(recipes)
    for name in linears:
        weight = out.pop(f"{name}.weight")
        out[f"{name}.qweight"] = lambda f, w=weight: quantize_int8_rows(w(f), scale_dtype)[0]
        out[f"{name}.scales"] = lambda f, w=weight: quantize_int8_rows(w(f), scale_dtype)[1]
    return out
