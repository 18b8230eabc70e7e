"""Images prepared as each family's makers prepare them, in every layout transformers writes.

The matrix: families (LLaVA / Nemovision with CLIP or SigLIP, InternVL -hf, VILA with each aspect
ratio) x folder layouts ("processor": transformers >= 5's processor save, the image processor nested
in processor_config.json; "hub": the Hub's older preprocessor_config.json beside a processor_config.json
of attributes only). Our pixels must equal the reference processor's output (PIL backend) for pictures
of many sizes and aspect ratios, and greedy answers must equal transformers' `generate` on those pixels
for 16 tokens. References: transformers' own processor classes loaded from the folder by transformers;
for VILA, VILA's `process_image` steps (written below from its code) over transformers' image processor.

Both sides resize with PIL on uint8 and normalise in float32: pixels agree to 1e-5. Logits go through
the same fp32 arithmetic up to summation order, so 16 greedy tokens must be identical.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from edge_vlm import ChatSession, GenerationConfig, load_model
from edge_vlm.formats.image_processor_config import ImagePreparationWarning
from edge_vlm.imaging.preprocess import preprocess
from tests.factories import LAYOUTS, internvl_processor, make_internvl_hf, make_llava, make_vila
from tests.runtime.test_vision_parity import reference_merge

SIZES = [(57, 43), (43, 57), (200, 50), (31, 31), (640, 480), (7, 300), (1000, 999)]
GREEDY16 = GenerationConfig(max_new_tokens=16, temperature=0)
FAMILIES = {
    "llava-clip-llama": dict(kind="llava", text_kind="llama", vision_kind="clip"),
    "nemovision-clip-nemotron": dict(kind="llava", text_kind="nemotron", vision_kind="clip", seed=7),
    "llava-siglip-llama": dict(kind="llava", text_kind="llama", vision_kind="siglip"),
    "internvl-hf": dict(kind="internvl"),
    "vila-siglip-resize": dict(kind="vila", vision_kind="siglip", aspect="resize"),
    "vila-siglip-pad": dict(kind="vila", vision_kind="siglip", aspect="pad"),
    "vila-clip-pad": dict(kind="vila", vision_kind="clip", aspect="pad", projector="mlp2x_gelu"),
    "vila-siglip-none": dict(kind="vila", vision_kind="siglip", aspect=None),
}


def picture(seed: int, size) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


class Case:
    """One family in one layout: the folder, the reference model, ours, and the reference pixels."""

    def __init__(self, family: str, layout: str, root):
        spec = dict(FAMILIES[family])
        self.kind, self.folder, self.family, self.layout = spec.pop("kind"), root / f"{family}-{layout}", family, layout
        if self.kind == "llava":
            self.ref = make_llava(self.folder, **{"seed": 2, **spec}, image_size=42, layout=layout)
        elif self.kind == "internvl":
            self.ref = make_internvl_hf(self.folder, seed=3, layout=layout)
        else:
            image = 42 if spec["vision_kind"] == "siglip" else 28
            self.ref = make_vila(self.folder, llm_kind="llama", seed=4, layout=layout, image_size=image, **spec)
        self.ours = load_model(self.folder, device="cpu", progress=False, fast_path=False)

    def reference_pixels(self, img: Image.Image) -> torch.Tensor:
        if self.kind == "llava":
            from transformers import AutoProcessor

            return AutoProcessor.from_pretrained(self.folder)(images=[img], text="<image>",
                                                              return_tensors="pt")["pixel_values"]
        if self.kind == "internvl":
            return internvl_processor(self.folder)(images=[img], text=["<IMG_CONTEXT>"],
                                                   return_tensors="pt")["pixel_values"]
        return vila_process_image(img, self.folder / "vision_tower", FAMILIES[self.family])

    def our_pixels(self, img: Image.Image) -> torch.Tensor:
        return preprocess(self.ours.image_tiles(img), self.ours.image_cfg)


def vila_process_image(img: Image.Image, vision_tower, spec) -> torch.Tensor:
    """VILA's `process_image` (llava/mm_utils.py), read from its code: the processor class VILA names for
    the tower, loaded by transformers from vision_tower/; "resize" squashes to the crop size (CLIP) or
    size (SigLIP) with PIL's default filter first, "pad" pastes onto a mean-coloured square first."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    cls = SiglipImageProcessorPil if spec["vision_kind"] == "siglip" else CLIPImageProcessorPil
    processor = cls.from_pretrained(vision_tower)
    side = (processor.crop_size if spec["vision_kind"] == "clip" else processor.size)["height"]
    if spec["aspect"] == "resize":
        img = img.resize((side, side))
    elif spec["aspect"] == "pad":
        w, h = img.size
        square = Image.new(img.mode, (max(w, h),) * 2, tuple(int(x * 255) for x in processor.image_mean))
        square.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        img = square
    return processor.preprocess(img, return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module", params=[(f, layout) for f in FAMILIES for layout in LAYOUTS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, tmp_path_factory):
    return Case(*request.param, tmp_path_factory.mktemp("prep"))


def test_pixels_equal_the_reference_processor(case):
    for i, size in enumerate(SIZES):
        img = picture(i, size)
        want, got = case.reference_pixels(img), case.our_pixels(img)
        assert got.shape == want.shape, size
        assert float((got - want).abs().max()) <= 1e-5, size


def prompt_ids(session: ChatSession, text: str, img, image_token: int) -> list[int]:
    """Our session's prompt as ids, each image embedding row shown as `image_token`."""
    _, chunks, need = session._question(text, [img])
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [image_token] * session.model.tokens_per_image + chunk
    assert len(ids) == need
    return ids


def test_greedy_answers_equal_transformers_generate(case):
    img = picture(99, (90, 61))
    session = ChatSession(case.ours)
    question = "Describe the image."
    pixels = case.reference_pixels(img)
    with torch.no_grad():
        if case.kind == "vila":
            llm, vision, proj = case.ref
            _, chunks, _ = session._question(question, [img])
            feats = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
            merged = reference_merge(feats) if case.ours.info.projector == "mlp_downsample" else feats
            emb = llm.get_input_embeddings()
            embeds = torch.cat([emb(torch.tensor([chunks[0]])), proj(merged), emb(torch.tensor([chunks[1]]))], 1)
            out = llm.generate(inputs_embeds=embeds, max_new_tokens=16, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0]
        else:
            token = case.ref.config.image_token_index if case.kind == "llava" else case.ref.config.image_token_id
            ids = prompt_ids(session, question, img, token)
            out = case.ref.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                                    pixel_values=pixels, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, len(ids):]
    got = session.answer(question, images=[img], gen=GREEDY16)
    assert session.stats.new_tokens == 16 and session.stats.stop_reason == "max_new_tokens"
    assert got == case.ours.tokenizer.decode(out.tolist())


def test_info_names_the_preparation_and_where_it_was_read(case):
    prep = case.ours.info.image_preparation
    where = {"processor": "processor_config.json (image_processor)", "hub": "preprocessor_config.json"}[case.layout]
    assert where in prep and "mean" in prep and "assumed" not in prep
    if case.kind == "internvl":
        assert "tiles of 56 px, 1-6 a picture + a thumbnail" in prep


def test_an_hf_internvl_folder_tiles_as_its_processor_does_whatever_crop_to_patches_says(tmp_path):
    """The -hf repos' preprocessor_config.json says crop_to_patches false; InternVLProcessor calls with
    true: a 4:3 picture is 12 tiles plus the thumbnail, not one (the bug: 32 prompt tokens for 224)."""
    import json

    make_internvl_hf(tmp_path / "m", seed=5, max_patches=12, layout="hub")
    assert json.loads((tmp_path / "m" / "preprocessor_config.json").read_text())["crop_to_patches"] is False
    ours = load_model(tmp_path / "m", device="cpu", progress=False, fast_path=False)
    img = picture(1, (800, 600))
    assert ours.tile_count(img) == 13 == internvl_processor(tmp_path / "m")(
        images=[img], text=["<IMG_CONTEXT>"], return_tensors="pt")["pixel_values"].shape[0]


@pytest.mark.parametrize("kind", ["llava", "vila"])
def test_a_folder_without_settings_warns_what_it_assumed(tmp_path, kind):
    folder = tmp_path / kind
    if kind == "llava":
        make_llava(folder, layout="none", image_size=42)
        assumed = "CLIPImageProcessor's defaults at the tower's 42 px"
    else:
        make_vila(folder, layout="none", image_size=42)
        assumed = "SiglipImageProcessor's defaults at the tower's 42 px"
    with pytest.warns(ImagePreparationWarning, match="keeps no image processor settings") as seen:
        model = load_model(folder, device="cpu", progress=False, fast_path=False)
    assert len(seen) == 1 and assumed in str(seen[0].message)
    assert "(assumed)" in model.info.image_preparation
    done = subprocess.run([sys.executable, "-m", "edge_vlm.cli", "info", str(folder)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    warning_lines = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warning_lines) == 1 and warning_lines[0].startswith("edge-vlm: warning: ") and assumed in warning_lines[0]
    (images,) = [line for line in done.stdout.splitlines() if line.startswith("images:")]
    assert "(assumed)" in images and "mean" in images


@pytest.mark.parametrize("settings,error", [
    ({"image_processor_type": "CLIPImageProcessor", "do_center_crop": False}, "without a centre crop"),
    ({"image_processor_type": "SiglipImageProcessor", "size": {"height": 42, "width": 56}}, "non-square size"),
    ({"image_processor_type": "Qwen2VLImageProcessor"}, "unsupported image processor 'Qwen2VLImageProcessor'"),
])
def test_settings_we_cannot_follow_are_refused_in_one_line(tmp_path, settings, error):
    import json

    from edge_vlm.errors import UnsupportedModelError

    make_llava(tmp_path / "m", layout="none", image_size=42)
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps(settings))
    with pytest.raises(UnsupportedModelError, match=error) as e:
        load_model(tmp_path / "m", device="cpu", progress=False, fast_path=False)
    assert "\n" not in str(e.value)
