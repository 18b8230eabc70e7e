"""NVILA's projectors (mlp_downsample_2x2_fix, mlp_downsample_3x3_fix and the 3x3_s2 variants) against
modules built here from VILA's layer lists (llava/model/multimodal_projector/base_projector.py), with the
patch merge written as plain loops over VILA's flat_square arithmetic."""

from __future__ import annotations

import pytest
import torch

from edge_vlm.formats.configs import ProjectorConfig
from edge_vlm.errors import UnsupportedModelError
from edge_vlm.models.projector import Projector, merge_2x2, merge_square, vila_module_names


def reference_square_merge(x: torch.Tensor, k: int) -> torch.Tensor:
    """VILA's flat_square_2x2 / flat_square_3x3 read plainly: the (rows, cols) grid gets zero rows at the
    bottom and zero columns at the right up to a multiple of k; output token p * blocks + q (row block p,
    column block q) concatenates the block's patches row by row."""
    n, t, c = x.shape
    side = int(round(t ** 0.5))
    padded = side + (k - side % k) % k
    grid = torch.zeros(n, padded, padded, c)
    grid[:, :side, :side] = x.view(n, side, side, c)
    blocks = padded // k
    out = torch.zeros(n, blocks * blocks, k * k * c)
    for p in range(blocks):
        for q in range(blocks):
            parts = [grid[:, k * p + a, k * q + b] for a in range(k) for b in range(k)]
            out[:, p * blocks + q] = torch.cat(parts, -1)
    return out


class LoopMerge(torch.nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        return reference_square_merge(x, self.k)


def reference_projector(kind: str, m: int, h: int, seed: int) -> torch.nn.Sequential:
    """VILA's `layers` Sequential for `kind` (same indices, hence the same checkpoint keys), random weights."""
    nn = torch.nn
    if kind == "mlp_downsample_2x2_fix":
        layers = [LoopMerge(2), nn.LayerNorm(4 * m), nn.Linear(4 * m, h), nn.GELU(), nn.Linear(h, h)]
    elif kind == "mlp_downsample_3x3_fix":
        layers = [LoopMerge(3), nn.LayerNorm(9 * m), nn.Linear(9 * m, 3 * m), nn.GELU(), nn.LayerNorm(3 * m),
                  nn.Linear(3 * m, h), nn.GELU(), nn.Linear(h, h)]
    elif kind == "mlp_downsample_3x3_s2":
        layers = [LoopMerge(3), nn.LayerNorm(9 * m), nn.Linear(9 * m, 3 * m), nn.GELU(), nn.LayerNorm(3 * m),
                  nn.Linear(3 * m, m), nn.GELU(), nn.LayerNorm(m), nn.Linear(m, m // 3), nn.GELU(),
                  nn.LayerNorm(m // 3), nn.Linear(m // 3, h), nn.GELU(), nn.Linear(h, h)]
    elif kind == "mlp_downsample_3x3_s2_new":
        layers = [LoopMerge(3), nn.LayerNorm(9 * m), nn.Linear(9 * m, 4 * m), nn.GELU(), nn.LayerNorm(4 * m),
                  nn.Linear(4 * m, 2 * m), nn.GELU(), nn.LayerNorm(2 * m), nn.Linear(2 * m, m), nn.GELU(),
                  nn.LayerNorm(m), nn.Linear(m, m // 3), nn.GELU(), nn.LayerNorm(m // 3), nn.Linear(m // 3, h),
                  nn.GELU(), nn.Linear(h, h)]
    else:
        raise ValueError(kind)
    seq = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in seq.parameters():  # LayerNorm weights too: a norm loaded into the wrong slot must show
            p.copy_(0.3 * torch.randn(p.shape, generator=gen) + (1.0 if p.dim() == 1 and p.shape[0] else 0.0))
    return seq


def load_ours(ref: torch.nn.Sequential, kind: str, m: int, h: int) -> Projector:
    cfg = ProjectorConfig(kind, m, h)
    names = vila_module_names(cfg)
    ours = Projector(cfg)
    state = {}
    for key, value in ref.state_dict().items():
        module, what = key.rsplit(".", 1)
        state[f"{names['layers.' + module]}.{what}"] = value
    ours.load_state_dict(state, strict=True)  # every key of ours filled, none left over
    return ours


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("side", [1, 2, 3, 4, 5, 6, 7, 8, 11, 27, 32])
def test_square_merge_matches_vila_order(k, side):
    x = torch.randn(2, side * side, 3)
    assert torch.equal(merge_square(x, k), reference_square_merge(x, k))


def test_nvila_order_differs_from_vila15_order():
    """mlp_downsample changed order in NVILA's code: the two merges agree only on a single block."""
    x = torch.randn(1, 16, 2)
    assert not torch.equal(merge_square(x, 2), merge_2x2(x))
    one_block = torch.randn(1, 4, 2)
    assert torch.equal(merge_square(one_block, 2), merge_2x2(one_block))


@pytest.mark.parametrize("kind", ["mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix", "mlp_downsample_3x3_s2",
                                  "mlp_downsample_3x3_s2_new"])
@pytest.mark.parametrize("side", [1, 2, 3, 4, 5, 7, 9, 16])
def test_projector_matches_vila_module(kind, side):
    m, h = 6, 10
    ref = reference_projector(kind, m, h, seed=side)
    ours = load_ours(ref, kind, m, h)
    x = torch.randn(3, side * side, m)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert got.shape == expected.shape
    assert ours.num_tokens(side * side) == expected.shape[1]
    # same float32 ops in the same order up to the merge's copies: only summation order may differ
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("kind,keys", [
    ("mlp_downsample_2x2_fix", [1, 2, 4]),
    ("mlp_downsample_3x3_fix", [1, 2, 4, 5, 7]),
    ("mlp_downsample_3x3_s2", [1, 2, 4, 5, 7, 8, 10, 11, 13]),
])
def test_checkpoint_indices(kind, keys):
    """The Sequential indices that hold weights in VILA's checkpoints (layers.N.weight / .bias)."""
    ref = reference_projector(kind, 6, 10, seed=0)
    held = sorted({int(k.split(".")[0]) for k in ref.state_dict()})
    assert held == keys
    assert sorted(int(k.split(".")[1]) for k in vila_module_names(ProjectorConfig(kind, 6, 10))) == keys


def test_widths_of_nvila_lite_3x3():
    """NVILA-Lite-shaped: SigLIP 1152 wide, LLM 1536: 9*1152 -> 3*1152 -> 1536 -> 1536, 32x32 -> 121 tokens."""
    proj = Projector(ProjectorConfig("mlp_downsample_3x3_fix", 1152, 1536))
    assert [(lin.in_features, lin.out_features) for lin in proj.linears] == [(10368, 3456), (3456, 1536),
                                                                             (1536, 1536)]
    assert [n.normalized_shape for n in proj.inner_norms] == [(3456,)]
    assert proj.num_tokens(1024) == 121 and proj.num_tokens(729) == 81


def test_nvila_era_mlp_downsample_is_the_row_order():
    vila15 = {"mm_hidden_size": 12}
    nvila = {"mm_hidden_size": 12, "dynamic_s2": True, "image_encoder": '{"_target_": "x"}'}
    kind = {"mm_projector_type": "mlp_downsample"}
    assert ProjectorConfig.from_vila(vila15, kind, 12, 20).kind == "mlp_downsample"
    assert ProjectorConfig.from_vila(nvila, kind, 12, 20).kind == "mlp_downsample_2x2_fix"
    assert ProjectorConfig.from_vila({"video_encoder": "{}"}, kind, 12, 20).kind == "mlp_downsample_2x2_fix"
    fix3 = {"mm_projector_type": "mlp_downsample_3x3_fix"}
    assert ProjectorConfig.from_vila(nvila, fix3, 12, 20).kind == "mlp_downsample_3x3_fix"


def test_bad_projectors_are_refused_clearly():
    with pytest.raises(UnsupportedModelError, match="unsupported projector 'mlp_downsample_4x4'; supported: .*"
                                                    "mlp_downsample_3x3_fix"):
        Projector(ProjectorConfig("mlp_downsample_4x4", 6, 10))
    with pytest.raises(UnsupportedModelError, match="divisible by 3"):
        Projector(ProjectorConfig("mlp_downsample_3x3_s2", 8, 10))
    with pytest.raises(ValueError, match="square grid"):
        Projector(ProjectorConfig("mlp_downsample_3x3_fix", 6, 10))(torch.randn(1, 12, 6))
