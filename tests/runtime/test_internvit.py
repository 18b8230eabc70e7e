"""InternVL / NVLM-D: InternViT (300M and 6B switches), pixel shuffle + mlp1, dynamic tiling, the prompt
formats and the three checkpoint layouts, each against transformers' native InternVL classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edge_vlm import ChatSession, GenerationConfig, load_model
from edge_vlm.imaging.preprocess import preprocess
from edge_vlm.models.projector import pixel_shuffle
from edge_vlm.imaging.tiling import TilingConfig, choose_grid, split_tiles, tile_count
from tests.factories import internvl_processor, make_internvl_hf, write_internvl_original

VARIANTS = {"300m": dict(norm="layer_norm", qk_norm=False), "6b": dict(norm="rms_norm", qk_norm=True)}


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def picture(seed: int, size=(150, 70)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def hf_pixels(model_dir, img, **images_kwargs) -> torch.Tensor:
    """The pixels transformers' InternVLProcessor gives one picture (its call-time defaults included)."""
    out = internvl_processor(model_dir)(images=[img], text=["<IMG_CONTEXT>"], return_tensors="pt", **images_kwargs)
    return out["pixel_values"]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def native(request, tmp_path_factory):
    """(transformers model, its -hf folder, our model loaded from it) per norm variant."""
    folder = tmp_path_factory.mktemp("internvl") / request.param
    ref = make_internvl_hf(folder, seed=3, **VARIANTS[request.param])
    return ref, folder, load_model(folder, device="cpu", progress=False, fast_path=False)


# ---------------------------------------------------------------- tower, pixel shuffle, mlp1

def test_pixel_shuffle_is_internvl_order():
    """Written out by index: token (i, j) of the 2x2-merged grid holds patches (2i, 2j), (2i, 2j+1),
    (2i+1, 2j), (2i+1, 2j+1) in that order (InternVL's v2 shuffle)."""
    side, c = 4, 3
    x = torch.arange(side * side * c, dtype=torch.float32).view(1, side * side, c)
    grid = x.view(side, side, c)
    expected = torch.stack([torch.cat([grid[2 * i, 2 * j], grid[2 * i, 2 * j + 1], grid[2 * i + 1, 2 * j],
                                       grid[2 * i + 1, 2 * j + 1]]) for i in range(2) for j in range(2)])
    assert torch.equal(pixel_shuffle(x)[0], expected)


def test_image_features_match_transformers(native):
    ref, _, ours = native
    tiles = split_tiles(picture(1), ours.tiling)
    pixels = preprocess(tiles, ours.image_cfg)
    with torch.no_grad():
        expected = ref.model.get_image_features(pixel_values=pixels).pooler_output
        got = ours.encode_images(tiles)
    assert got.shape == expected.shape == (len(tiles), ours.tokens_per_image, ref.config.text_config.hidden_size)
    assert rel_err(got, expected) <= 1e-4


def test_448px_tile_gives_256_tokens(tmp_path):
    """The real geometry: a 448 px tile is 1024 patches, pixel-shuffled to 256 tokens (both variants)."""
    for name, kw in VARIANTS.items():
        ref = make_internvl_hf(tmp_path / name, image_size=448, layers=1, seed=4, **kw)
        ours = load_model(tmp_path / name, device="cpu", progress=False, fast_path=False)
        img = picture(2, (448, 448))
        with torch.no_grad():
            expected = ref.model.get_image_features(pixel_values=preprocess([img], ours.image_cfg)).pooler_output
            got = ours.encode_images([img])
        assert ours.vision.num_tokens == 1024 and ours.tokens_per_image == 256 == got.shape[1]
        assert rel_err(got, expected) <= 1e-4, name


# ---------------------------------------------------------------- tiling

def test_grid_choice_matches_reference_over_many_shapes():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    rng = np.random.default_rng(0)
    sizes = [(448, 448), (896, 448), (448, 896), (500, 400), (1000, 10), (10, 1000), (1344, 896), (560, 448)]
    sizes += [tuple(int(v) for v in rng.integers(8, 3000, 2)) for _ in range(300)]
    for max_tiles in (1, 2, 4, 6, 12):
        cfg = TilingConfig(448, 1, max_tiles)
        for w, h in sizes:
            assert choose_grid(w, h, cfg) == get_optimal_tiled_canvas((h, w), (448, 448), 1, max_tiles), (w, h)


@pytest.mark.parametrize("size,max_tiles", [((150, 70), 6), ((70, 150), 6), ((56, 56), 6), ((300, 40), 4),
                                            ((200, 120), 12), ((150, 70), 1)])
def test_tiles_and_pixels_match_reference_processor(native, size, max_tiles):
    _, folder, ours = native
    img = picture(sum(size), size)
    cfg = ours.tiling.with_max_tiles(max_tiles)
    ref = hf_pixels(folder, img, max_patches=max_tiles)
    tiles = split_tiles(img, cfg)
    assert len(tiles) == tile_count(*size, cfg) == ref.shape[0]
    got = preprocess(tiles, ours.image_cfg)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= 1e-6


def test_max_tiles_one_is_one_tile_and_load_option(native):
    _, folder, _ = native
    one = load_model(folder, device="cpu", progress=False, fast_path=False, max_tiles=1)
    assert one.tiling.max_tiles == 1 and one.info.max_tiles == 1
    assert len(one.image_tiles(picture(5, (900, 300)))) == 1
    with pytest.raises(ValueError):
        TilingConfig().with_max_tiles(0)


# ---------------------------------------------------------------- prompt, logits, generation

CONTEXT = "<IMG_CONTEXT>"


def reference_internvl_prompt(question: str, tiles: int, per_tile: int) -> str:
    """InternVL's chat(): the internvl2_5 conversation, '<image>\\n' before the question, the mark
    replaced by <img> + <IMG_CONTEXT> x (tiles * tokens per tile) + </img>. Written from the format."""
    system = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
    image = "<img>" + CONTEXT * (tiles * per_tile) + "</img>"
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{image}\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


def session_ids(session: ChatSession, text: str, pictures, context_id: int):
    """Our session's prompt as token ids, every image embedding row shown as the context token."""
    _, chunks, need = session._question(text, pictures)
    n = session.model.tokens_per_image
    tiles = [session.model.tile_count(p) for p in pictures]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [context_id] * n + chunk
    assert len(ids) == need and len(chunks) == sum(tiles) + 1
    return ids, chunks


def test_two_tile_prompt_is_the_reference_format(native):
    _, _, ours = native
    img = picture(7, (112, 56))  # 2:1 -> a 2x1 grid
    model_tiles = ours.tiling
    assert ours.with_run(tiling=model_tiles.with_max_tiles(2)).tile_count(img) == 3  # 2 grid tiles + the thumbnail
    two = ours.with_run(tiling=TilingConfig(model_tiles.tile_size, 1, 2, thumbnail=False))
    assert two.tile_count(img) == 2 and ours.tiling == model_tiles  # exactly 2 tiles; the loaded model as it was
    tok = two.tokenizer
    context_id = tok.token_to_id(CONTEXT)
    ids, _ = session_ids(ChatSession(two), "Describe the image.", [img], context_id)
    assert ids == tok.encode(reference_internvl_prompt("Describe the image.", 2, two.tokens_per_image))


def test_image_prompt_logits_match_transformers(native):
    ref, folder, ours = native
    img = picture(8, (150, 70))
    session = ChatSession(ours)
    context_id = ours.tokenizer.token_to_id(CONTEXT)
    ids, chunks = session_ids(session, "What is in this picture?", [img], context_id)
    assert ids == ours.tokenizer.encode(reference_internvl_prompt(
        "What is in this picture?", ours.tile_count(img), ours.tokens_per_image))
    pixels = hf_pixels(folder, img)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
        embeds = session.engine.embed(session._prompt(chunks, [img]))
        got = ours.llm(embeds, ours.llm.new_cache(len(ids) + 8), all_logits=True)
    assert rel_err(got, expected) <= 1e-4


def test_greedy_generation_token_for_token(native):
    ref, folder, ours = native
    img = picture(9, (90, 130))
    session = ChatSession(ours)
    ids, _ = session_ids(session, "Describe the image.", [img], ours.tokenizer.token_to_id(CONTEXT))
    pixels = hf_pixels(folder, img)
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=10, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    expected = ours.tokenizer.decode(out[0, len(ids):].tolist())
    got = session.answer("Describe the image.", images=[img], gen=GenerationConfig(max_new_tokens=10, temperature=0))
    assert session.stats.new_tokens == 10 and session.stats.stop_reason == "max_new_tokens"
    assert got == expected


# ---------------------------------------------------------------- checkpoint layouts

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_original_and_nvlm_layouts_load_into_the_same_modules(tmp_path, variant):
    """InternVL's original layout and NVLM-D's (fused qkv, dummy heads, bias-free mlp1 of the LLM's
    intermediate width, Qwen2 written as llama) give the native model's logits."""
    ref = make_internvl_hf(tmp_path / "hf", seed=6, projector_bias=False, intermediate_size=64, **VARIANTS[variant])
    write_internvl_original(tmp_path / "orig", ref, tmp_path / "hf", style="internvl")
    write_internvl_original(tmp_path / "nvlm", ref, tmp_path / "hf", style="nvlm", dummy_heads=3)
    img = picture(10, (150, 70))
    logits = {}
    for name in ("hf", "orig", "nvlm"):
        model = load_model(tmp_path / name, device="cpu", progress=False, fast_path=False)
        assert model.info.layout == "internvl" and model.llm.cfg.arch == "qwen2"
        session = ChatSession(model, system="Answer briefly.")
        context_id = model.tokenizer.token_to_id(CONTEXT)
        _, chunks = session_ids(session, "Hi <image>", [img], context_id)
        with torch.no_grad():
            embeds = session.engine.embed(session._prompt(chunks, [img]))
            logits[name] = model.llm(embeds, model.llm.new_cache(embeds.shape[1] + 4), all_logits=True)[0, -5:]
        if name == "nvlm":
            assert model.image_format == "nvlm" and model.projector.cfg.bias is False
            assert model.template.name == "chatml"
        else:
            assert model.image_format == "internvl" and model.template.name == "internvl2_5"
    # NVLM-D's tile tags change the prompt; compare the tower + projector directly for it
    assert rel_err(logits["orig"], logits["hf"]) <= 1e-4
    models = {n: load_model(tmp_path / n, device="cpu", progress=False, fast_path=False) for n in ("hf", "nvlm")}
    tiles = models["hf"].image_tiles(img)
    with torch.no_grad():
        assert rel_err(models["nvlm"].encode_images(tiles), models["hf"].encode_images(tiles)) <= 1e-5
        assert rel_err(models["nvlm"].llm.lm_head.weight, models["hf"].llm.lm_head.weight) == 0


def test_nvlm_prompt_has_tile_tags(tmp_path):
    """NVLM-D's format, written from its definition: <Image>, <tile_k> before each grid tile's context
    tokens, <tile_global_thumbnail> before the thumbnail's, </Image>; ChatML around it."""
    ref = make_internvl_hf(tmp_path / "hf", seed=6, projector_bias=False, intermediate_size=64)
    write_internvl_original(tmp_path / "nvlm", ref, tmp_path / "hf", style="nvlm", dummy_heads=1, max_tiles=2)
    model = load_model(tmp_path / "nvlm", device="cpu", progress=False, fast_path=False)
    img = picture(11, (112, 56))
    assert model.tile_count(img) == 3
    n = model.tokens_per_image
    ctx = "<|vision_pad|>"
    image = "<Image>" + "<tile_1>" + ctx * n + "<tile_2>" + ctx * n + "<tile_global_thumbnail>" + ctx * n + "</Image>"
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + image
                + "\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")
    session = ChatSession(model)
    ids, _ = session_ids(session, "What is this?", [img], model.tokenizer.token_to_id(ctx))
    assert ids == model.tokenizer.encode(expected)
    one = picture(12, (56, 56))  # a single tile is tagged as the thumbnail, as NVLM-D's chat() does
    ids, _ = session_ids(session, "What is this?", [one], model.tokenizer.token_to_id(ctx))
    image = "<Image><tile_global_thumbnail>" + ctx * n + "</Image>"
    assert ids == model.tokenizer.encode(expected.replace(expected[expected.index("<Image>"):
                                                                   expected.index("</Image>") + 8], image))


def test_nvlm_live_padding_heads_are_refused(tmp_path):
    from edge_vlm.errors import UnsupportedModelError
    from safetensors.torch import load_file, save_file

    ref = make_internvl_hf(tmp_path / "hf", seed=6, projector_bias=False, intermediate_size=64)
    write_internvl_original(tmp_path / "nvlm", ref, tmp_path / "hf", style="nvlm", dummy_heads=1)
    path = tmp_path / "nvlm" / "model.safetensors"
    sd = load_file(path)
    key = "vision_model.encoder.layers.0.attn.qkv.weight"
    sd[key][-1] = 1.0  # a padding head's v row that the (non-zero) output columns would read
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="padding heads"):
        load_model(tmp_path / "nvlm", device="cpu", progress=False, fast_path=False)


# ---------------------------------------------------------------- video frames and several images

def test_video_frames_take_one_tile_and_several_images_their_own(native, tmp_path):
    from tests.runtime.test_vlm import write_video

    _, _, ours = native
    session = ChatSession(ours)
    video = write_video(tmp_path / "clip.mp4", frames=12, size=(160, 64))
    a, b = picture(13, (150, 70)), picture(14, (60, 140))
    pictures = session._pictures([a, b], video, 3)
    tiles = [ours.tile_count(p) for p in pictures]
    assert tiles[:2] == [tile_count(150, 70, ours.tiling), tile_count(60, 140, ours.tiling)] and tiles[2:] == [1] * 3
    assert tiles[0] > 1 and tiles[1] > 1
    question = "Two images and a clip."
    need = session._question(question, pictures)[2]
    assert session.tokens_needed(question, images=[a, b]) == session._question(question, [a, b])[2]
    assert session.tokens_needed(question, 2) >= session.tokens_needed(question, images=[a, b])  # the most tiles
    "".join(session.ask(question, images=[a, b], video=video, frames=3,
                        gen=GenerationConfig(max_new_tokens=3, temperature=0)))
    assert session.stats.prompt_tokens == need
    assert session.turns[0].question.count("<image>") == 5
    # the next turn's prompt only carries its own image: the cache holds the first turn
    before = session.position
    "".join(session.ask("And this one?", images=[b], gen=GenerationConfig(max_new_tokens=2, temperature=0)))
    assert session.position - before >= tile_count(60, 140, ours.tiling) * ours.tokens_per_image


def test_max_tiles_cli_option_reaches_the_model(native):
    import argparse

    from edge_vlm.cli.options import add_model_options, load_from_args

    _, folder, _ = native
    p = argparse.ArgumentParser()
    add_model_options(p)
    args = p.parse_args(["--max-tiles", "2", "--device", "cpu", "--backend", "torch"])
    args.model = str(folder)
    model = load_from_args(args)
    assert model.tiling.max_tiles == 2 and model.tile_count(picture(15, (400, 100))) == 3


# ---------------------------------------------------------------- int8 vision weights (InternViT-6B)

def test_int8_linear_error_is_within_half_a_step_per_weight():
    """y_q - y = x @ (W_q - W)^T and each |W_q - W| <= scale_row / 2, so every output is off by at most
    sum_j |x_j| * scale_i / 2: checked exactly (fp64 arithmetic) on random inputs."""
    from edge_vlm.formats.int8_rows import Int8Linear, int8_weight_recipes, use_int8_linears

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(96, 40)).double()
    with torch.no_grad():
        ref[0].weight[3] *= 30  # one row with a big range: its own scale, the others unaffected
    q = torch.nn.Sequential(torch.nn.Linear(96, 40)).double()
    assert use_int8_linears(q) == ["0"] and isinstance(q[0], Int8Linear)
    recipes = int8_weight_recipes({"0.weight": lambda f: f("w"), "0.bias": lambda f: f("b")}, ["0"], torch.float64)
    got = {k: r({"w": ref[0].weight.detach(), "b": ref[0].bias.detach()}.get) for k, r in recipes.items()}
    assert got["0.qweight"].dtype == torch.int8 and set(got) == {"0.qweight", "0.scales", "0.bias"}
    q.load_state_dict(got)
    x = torch.randn(16, 96, dtype=torch.float64)
    with torch.no_grad():
        err = (q(x) - ref(x)).abs()
    bound = x.abs() @ (got["0.scales"] / 2)[None].expand(96, -1)
    assert bool((err <= bound + 1e-12).all()) and float(err.max()) > 0
    assert float(got["0.scales"][3]) > 10 * float(got["0.scales"][2])


@pytest.mark.parametrize("variant", ["6b", "300m"])
def test_vision_int8_tower_stays_close_to_fp32(tmp_path, variant):
    """load_model(vision_int8=True): every tower Linear int8 (the projector as loaded), its features within
    int8 rounding of the fp32 tower's on random tiles. Each weight is off by at most max|row|/254, uniformly:
    rms max|row|/440, which for these 32-wide Gaussian rows (max ~2.1 sigma) is ~0.5% of a weight, so each
    Linear's output moves by ~0.5% of its size. The 12 Linears' errors are independent and enter the
    residual stream through branches that make up only part of it (the embeddings pass unquantized), so
    the features move by less than that (measured 0.09%): 1% is the bound, and more than 1e-4 shows the
    weights really are int8 (fp32 alone differs by ~1e-7). Layer scales are set to 1 so that the branches
    carry their full weight."""
    from edge_vlm.formats.int8_rows import Int8Linear

    make_internvl_hf(tmp_path / variant, seed=5, **VARIANTS[variant])
    ref = load_model(tmp_path / variant, device="cpu", progress=False, fast_path=False)
    q = load_model(tmp_path / variant, device="cpu", progress=False, fast_path=False, vision_int8=True)
    linears = [m for m in q.vision.modules() if isinstance(m, (Int8Linear, torch.nn.Linear))]
    assert len(linears) == 6 * 2 and all(isinstance(m, Int8Linear) for m in linears)
    assert q.info.vision_quantization == "int8" and not any(isinstance(m, Int8Linear) for m in q.projector.modules())
    tiles = [picture(20 + i, (56, 56)) for i in range(3)]
    with torch.no_grad():
        for m in (ref, q):  # full-strength branches (the factory's random layer scales are ~0.08)
            for layer in m.vision.layers:
                layer.ls1.fill_(1.0), layer.ls2.fill_(1.0)
        expected, got = ref.encode_images(tiles), q.encode_images(tiles)
    err = float((got - expected).norm() / expected.norm())
    assert 1e-4 < err < 0.01, err
    fp32 = sum(m.weight.numel() * 4 for m in ref.vision.modules() if isinstance(m, torch.nn.Linear))
    int8 = sum(m.qweight.numel() + m.scales.numel() * 4 for m in linears)
    saved = ref.memory_estimate()["weights"] - q.memory_estimate()["weights"]
    assert saved == fp32 - int8 > 0


# ---------------------------------------------------------------- NVLM-D's chat format

# NVLM-D's prompt as the public reference builds it: vLLM's NVLM-D example renders the repo tokenizer's
# chat template (Qwen2-72B-Instruct's ChatML: "You are a helpful assistant." unless a system message is
# given, every turn `<|im_start|>ROLE\n...<|im_end|>\n`), with `<image>\n` before the question, and
# NVLM-D's chat() writes each image as <Image>, <tile_k> + context tokens per grid tile,
# <tile_global_thumbnail> + context tokens, </Image>. Written here from that format, not from our code.
def nvlm_reference(turns: list[tuple[str, str | None]], system: str | None = None) -> str:
    out = f"<|im_start|>system\n{system or 'You are a helpful assistant.'}<|im_end|>\n"
    for user, answer in turns:
        out += f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        if answer is not None:
            out += f"{answer}<|im_end|>\n"
    return out


# The same ChatML as a checkpoint would carry it in tokenizer_config.json (our own Jinja for it)
QWEN2_CHATML_JINJA = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("source", ["builtin", "checkpoint"])
def test_nvlm_chat_template_is_the_reference_chatml(tmp_path, source):
    """Without a template in the checkpoint we render NVLM-D's config `template: chatml` as the built-in
    chatml; with one (the real repo's tokenizer has it) the checkpoint's Jinja is used. Both equal the
    reference string for one and two turns, with and without a system message, and the session's
    image prompt (2 grid tiles + thumbnail) is that string token for token."""
    import json

    ref = make_internvl_hf(tmp_path / "hf", seed=6, projector_bias=False, intermediate_size=64)
    write_internvl_original(tmp_path / "nvlm", ref, tmp_path / "hf", style="nvlm", dummy_heads=1, max_tiles=2)
    if source == "checkpoint":
        path = tmp_path / "nvlm" / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": QWEN2_CHATML_JINJA}))
    model = load_model(tmp_path / "nvlm", device="cpu", progress=False, fast_path=False)
    assert model.template.name == ("chatml" if source == "builtin" else "checkpoint")
    tpl = model.template
    one = [{"role": "user", "content": "<image>\nWhat is this?"}]
    assert tpl.render(one) == nvlm_reference([("<image>\nWhat is this?", None)])
    two = one + [{"role": "assistant", "content": "A cat."}, {"role": "user", "content": "And its colour?"}]
    assert tpl.render(two) == nvlm_reference([("<image>\nWhat is this?", "A cat."), ("And its colour?", None)])
    sys = [{"role": "system", "content": "Answer briefly."}] + one
    assert tpl.render(sys) == nvlm_reference([("<image>\nWhat is this?", None)], system="Answer briefly.")
    # the second turn continues the first exactly: history + continuation == the two-turn reference
    assert tpl.render(one) + "A cat." + tpl.continuation(one + [{"role": "assistant", "content": "A cat."}],
                                                          [{"role": "user", "content": "And its colour?"}]) \
        == tpl.render(two)

    img = picture(11, (112, 56))
    n, ctx = model.tokens_per_image, "<|vision_pad|>"
    image = "<Image><tile_1>" + ctx * n + "<tile_2>" + ctx * n + "<tile_global_thumbnail>" + ctx * n + "</Image>"
    ids, _ = session_ids(ChatSession(model), "What is this?", [img], model.tokenizer.token_to_id(ctx))
    assert ids == model.tokenizer.encode(nvlm_reference([(image + "\nWhat is this?", None)]))
