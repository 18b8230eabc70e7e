"""Swapping submodules for their fast versions, one at a time (shared by every backend)."""

from __future__ import annotations

import torch.nn as nn


def swap_modules(root: nn.Module, match, make, label: str, keep_inside: type | tuple[type, ...] = ()) -> dict[str, int]:
    """Replace every submodule that `match`es with `make(module)`; returns {label: how many}.

    Only names are collected up front: each replaced module is freed before the next is made, so
    converting a model costs one layer of extra memory, not a second copy of all its weights.
    Children of a `keep_inside` module (a fast module's own fallback) are left as they are.
    """
    names = []
    for name, module in root.named_modules():
        parent_name = name.rpartition(".")[0]
        parent = root.get_submodule(parent_name) if parent_name else root
        if name and not isinstance(parent, keep_inside) and match(module):
            names.append(name)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, make(getattr(parent, child)))
    return {label: len(names)} if names else {}
