"""Vision towers, projectors and image preprocessing vs the reference implementations.

Towers/projectors: float32, same tolerance argument as the LLM (1e-4 relative is ~100x the
rounding noise). Preprocessing: both sides resize with PIL and normalise in float32, so
pixels must agree to 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edge_vlm.formats.configs import ImageConfig, ProjectorConfig, VisionConfig
from edge_vlm.formats.image_processor_config import settings_image_config
from edge_vlm.imaging.preprocess import preprocess
from edge_vlm.models.projector import Projector, merge_2x2
from edge_vlm.models.vision import VisionTower
from tests.factories import make_vision, preprocessor_config, vila_projector


def rel_err(a, b) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def load_tower(ref, kind: str, select_layer=-2, select_feature=None) -> VisionTower:
    select_feature = select_feature or ("patch" if kind == "clip" else "cls_patch")
    cfg = VisionConfig.from_hf(ref.config.to_dict() | {"model_type": f"{kind}_vision_model"}, select_layer,
                               select_feature)
    tower = VisionTower(cfg)
    state = {k.replace("vision_model.", "").replace("encoder.layers.", "layers."): v
             for k, v in ref.state_dict().items()}
    tower.load_state_dict({k: v for k, v in state.items() if k in tower.state_dict()}, strict=True)
    return tower.eval()


@pytest.mark.parametrize("over", [dict(), dict(image_size=56, num_hidden_layers=4),
                                  dict(image_size=70, patch_size=14, hidden_size=32, num_attention_heads=2)])
@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_tower_matches_transformers_penultimate_layer(kind, over):
    ref = make_vision(kind, seed=3, **over)
    size = ref.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    if kind == "clip":
        expected = expected[:, 1:]  # LLaVA "patch" features: the CLS token is dropped
    ours = load_tower(ref, kind)
    with torch.no_grad():
        got = ours(pixels)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= 1e-4
    assert len(ours.layers) == ref.config.num_hidden_layers - 1  # the last layer is never run


def test_siglip_keeps_all_tokens_and_positive_select_layer():
    ref = make_vision("siglip", seed=4)
    pixels = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        expected = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[1]
    ours = load_tower(ref, "siglip", select_layer=1, select_feature="cls_patch")
    with torch.no_grad():
        assert rel_err(ours(pixels), expected) <= 1e-4


def reference_merge(x: torch.Tensor) -> torch.Tensor:
    """VILA's 2x2 merge written as explicit loops: pad odd sides with zeros; token (i, j) of the
    output walks column blocks j first... i.e. index = j * rows + i, features (2i,2j),(2i,2j+1),(2i+1,2j),(2i+1,2j+1)."""
    n, t, c = x.shape
    s = int(t ** 0.5)
    g = torch.zeros(n, s + s % 2, s + s % 2, c)
    g[:, :s, :s] = x.view(n, s, s, c)
    half = g.shape[1] // 2
    out = torch.zeros(n, half * half, 4 * c)
    for j in range(half):
        for i in range(half):
            out[:, j * half + i] = torch.cat([g[:, 2 * i, 2 * j], g[:, 2 * i, 2 * j + 1],
                                              g[:, 2 * i + 1, 2 * j], g[:, 2 * i + 1, 2 * j + 1]], -1)
    return out


@pytest.mark.parametrize("side", [2, 3, 4, 27])
def test_merge_2x2_matches_vila_order(side):
    x = torch.randn(2, side * side, 5)
    assert torch.equal(merge_2x2(x), reference_merge(x))


@pytest.mark.parametrize("kind", ["mlp_downsample", "mlp2x_gelu", "linear", "mlp3x_gelu"])
def test_projector_matches_vila_module(kind):
    from edge_vlm.formats.recipes import rename_projector

    mm, hidden, side = 12, 20, 5
    ref = vila_projector(kind, mm, hidden, seed=1)
    ours = Projector(ProjectorConfig(kind, mm, hidden))
    state = {rename_projector("", kind)(f"layers.{k}"): v for k, v in ref.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    x = torch.randn(3, side * side, mm)
    expected = ref(reference_merge(x)) if kind == "mlp_downsample" else ref(x)
    assert ours.num_tokens(side * side) == expected.shape[1]
    assert rel_err(ours(x), expected) <= 1e-5


def photos():
    from skimage import data

    rng = np.random.default_rng(0)
    return {"chelsea": data.chelsea(), "astronaut": data.astronaut(), "coffee": data.coffee(),
            "tall-odd": rng.integers(0, 256, (301, 157, 3), dtype=np.uint8),
            "tiny": rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)}


@pytest.mark.parametrize("name", list(photos()))
@pytest.mark.parametrize("kind,size", [("siglip", 384), ("clip", 336), ("clip", 224)])
def test_preprocessing_matches_hf_image_processor(kind, size, name):
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    img = Image.fromarray(photos()[name])
    pre = preprocessor_config(kind, size)
    cls = SiglipImageProcessor if kind == "siglip" else CLIPImageProcessor
    expected = torch.as_tensor(np.asarray(cls(**pre)(img, return_tensors="np")["pixel_values"]))
    got = preprocess([img], settings_image_config(pre))
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 1e-5


def test_pad_mode_pads_with_the_mean_colour():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    cfg = ImageConfig(size=20, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize="shortest_edge", crop=True,
                      pad_to_square=True)
    x = preprocess([img], cfg)[0]
    # top and bottom quarter are the (127,127,127) pad colour, the middle is pure red
    assert torch.allclose(x[:, 0, 10], torch.full((3,), 127 / 255 * 2 - 1), atol=1e-6)
    assert torch.allclose(x[:, 10, 10], torch.tensor([1.0, -1.0, -1.0]), atol=1e-6)
