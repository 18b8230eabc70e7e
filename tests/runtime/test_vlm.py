"""End-to-end multimodal paths: VILA and LLaVA folders vs a composition of transformers modules,
several images and video in one turn, and the multi-turn KV cache vs recomputation."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from edge_vlm import ChatSession, GenerationConfig, load_model
from edge_vlm.imaging.preprocess import preprocess
from tests.factories import make_llava, make_vila
from tests.runtime.test_vision_parity import reference_merge

GREEDY = GenerationConfig(max_new_tokens=12, temperature=0)


def rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def random_image(seed: int, size=(57, 43)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("llm_kind,projector", [("llama", "mlp_downsample"), ("qwen2", "mlp2x_gelu"),
                                                ("nemotron", "linear")])
def test_vila_logits_match_transformers_composition(tmp_path, llm_kind, projector):
    llm, vision, proj = make_vila(tmp_path / "m", llm_kind=llm_kind, projector=projector, seed=5)
    ours = load_model(tmp_path / "m", device="cpu", progress=False, fast_path=False)
    img = random_image(1)
    ids_a, ids_b = torch.tensor([[1, 40, 41, 42]]), torch.tensor([[43, 44, 45, 46, 47]])
    with torch.no_grad():
        pixels = preprocess([img], ours.image_cfg)
        feats = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        feats = proj(reference_merge(feats)) if projector == "mlp_downsample" else proj(feats)
        emb = llm.get_input_embeddings()
        expected = llm(inputs_embeds=torch.cat([emb(ids_a), feats, emb(ids_b)], 1)).logits
        got_embeds = torch.cat([ours.llm.embed(ids_a), ours.encode_images([img]), ours.llm.embed(ids_b)], 1)
        got = ours.llm(got_embeds, ours.llm.new_cache(64), all_logits=True)
    assert ours.tokens_per_image == feats.shape[1]
    assert rel_err(got, expected) <= 1e-4


@pytest.mark.parametrize("text_kind,vision_kind", [("nemotron", "clip"), ("llama", "siglip")])
def test_llava_folder_matches_transformers_llava(tmp_path, text_kind, vision_kind):
    ref = make_llava(tmp_path / "m", text_kind=text_kind, vision_kind=vision_kind, seed=2)
    ours = load_model(tmp_path / "m", device="cpu", progress=False, fast_path=False)
    img = random_image(2)
    n = ours.tokens_per_image
    image_token = ref.config.image_token_index
    ids_a, ids_b = [1, 40, 41], [43, 44, 45, 46]
    with torch.no_grad():
        pixels = preprocess([img], ours.image_cfg)
        expected = ref(input_ids=torch.tensor([ids_a + [image_token] * n + ids_b]), pixel_values=pixels).logits
        embeds = torch.cat([ours.llm.embed(torch.tensor([ids_a])), ours.encode_images([img]),
                            ours.llm.embed(torch.tensor([ids_b]))], 1)
        got = ours.llm(embeds, ours.llm.new_cache(64), all_logits=True)
    assert rel_err(got, expected) <= 1e-4


def write_video(path, frames: int = 20, size=(64, 48)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, size)
    for i in range(frames):
        frame = np.full((size[1], size[0], 3), (i * 12) % 256, dtype=np.uint8)
        cv2.putText(frame, str(i), (5, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2)
        writer.write(frame)
    writer.release()
    return path


def test_several_images_and_video_in_one_turn(tiny_vila, tmp_path):
    model = load_model(tiny_vila, device="cpu", progress=False)
    session = ChatSession(model)
    video = write_video(tmp_path / "clip.mp4")
    text_only = ChatSession(model)
    text_only.answer("Describe.", gen=GenerationConfig(max_new_tokens=1, temperature=0))
    base = text_only.stats.prompt_tokens
    session.answer("Describe.", images=[random_image(3), random_image(4)], video=video, frames=5, gen=GREEDY)
    # each image adds its tokens plus the "<image>\n" text around it
    per_image_text = len(model.tokenizer.encode("\n"))
    assert session.stats.prompt_tokens == base + 7 * (model.tokens_per_image + per_image_text)
    assert session.messages[0]["content"].count("<image>") == 7


def test_images_are_placed_where_the_image_mark_stands(tiny_vila):
    model = load_model(tiny_vila, device="cpu", progress=False)
    session = ChatSession(model)
    fed = []
    real_prefill = session.engine.prefill
    session.engine.prefill = lambda prompt: fed.append(session.engine.embed(prompt)[0]) or real_prefill(prompt)
    pictures = [random_image(1), random_image(2)]
    session.answer("Compare <image> with <image> please", images=pictures, gen=GenerationConfig(max_new_tokens=1))
    assert session.messages[0]["content"] == "Compare <image> with <image> please"
    feats, n = model.encode_images(pictures), model.tokens_per_image
    rows = fed[0]
    starts = [i for i in range(rows.shape[0] - n + 1) if torch.equal(rows[i], feats[0][0])]
    assert len(starts) == 1
    first = starts[0]
    between = torch.tensor(model.tokenizer.encode(" with "))
    second = first + n + len(between)
    assert torch.equal(rows[first:first + n], feats[0]) and torch.equal(rows[second:second + n], feats[1])
    assert torch.equal(rows[first + n:second], model.llm.embed(between))


def test_multi_turn_cache_reuse_equals_recomputation(tiny_vila):
    """Turn 2 runs only its own tokens on top of the cache; the logits it produces must equal a
    from-scratch forward pass over everything fed so far."""
    model = load_model(tiny_vila, device="cpu", progress=False)
    session = ChatSession(model)
    fed, produced = [], []
    engine = session.engine
    real_prefill, real_step = engine.prefill, engine.step

    def prefill(prompt):
        fed.append(engine.embed(prompt))
        out = real_prefill(prompt)
        produced.append((engine.position - 1, out))
        return out

    def step(token):
        fed.append(model.llm.embed(torch.tensor([[token]])))
        out = real_step(token)
        produced.append((engine.position - 1, out))
        return out

    engine.prefill, engine.step = prefill, step
    session.answer("What is this?", images=[random_image(5)], gen=GREEDY)
    first_turn_end = engine.position
    session.answer("And what colour is it?", gen=GREEDY)
    assert session.stats.prompt_tokens < engine.position - first_turn_end + 2  # only the new turn was run
    with torch.no_grad():
        everything = torch.cat(fed, 1)
        full = model.llm(everything, model.llm.new_cache(everything.shape[1]), all_logits=True)[0]
    for pos, logits in produced:
        assert rel_err(logits, full[pos]) <= 1e-4


def test_reset_starts_a_new_conversation(tiny_vila):
    model = load_model(tiny_vila, device="cpu", progress=False)
    session = ChatSession(model)
    first = session.answer("Hello there", gen=GREEDY)
    session.answer("More", gen=GREEDY)
    session.reset()
    assert session.answer("Hello there", gen=GREEDY) == first
    assert len(session.messages) == 2


def test_vila_config_fields_are_honoured(tmp_path):
    make_vila(tmp_path / "m", seed=1)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["mm_vision_select_layer"] = -3
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    model = load_model(tmp_path / "m", device="cpu", progress=False)
    assert len(model.vision.layers) == 1  # 3-layer tower, hidden_states[-3] = after layer 1


@pytest.mark.parametrize("bf16_faster", [True, False])
def test_cpu_vision_runs_in_bf16_only_where_that_is_faster(tiny_vila, monkeypatch, bf16_faster):
    """On CPU the vision tower and projector run in bf16 when dense bf16 matmuls are the faster
    ones here (timed once); the LLM keeps its dtype and receives its own dtype back."""
    from edge_vlm.backends import cpu

    monkeypatch.setattr(cpu, "cpu_bf16_matmul_is_faster", lambda: bf16_faster)
    fast = load_model(tiny_vila, device="cpu", progress=False)
    ref = load_model(tiny_vila, device="cpu", progress=False, fast_path=False)
    tower = torch.bfloat16 if bf16_faster else torch.float32
    assert next(fast.vision.parameters()).dtype == next(fast.projector.parameters()).dtype == tower
    assert fast.llm.dtype == ref.llm.dtype == torch.float32
    images = [random_image(3), random_image(4, size=(40, 70))]
    got, want = fast.encode_images(images), ref.encode_images(images)
    assert got.dtype == torch.float32 and got.shape == want.shape
    if bf16_faster:
        # bf16 weights and activations: 2^-9 relative per rounding, a few dozen roundings deep
        # (2 tower layers + projector) -> a few percent of the largest feature at most
        assert 0 < rel_err(got, want) <= 2**-4
    else:
        assert torch.equal(got, want)


def test_how_a_model_runs_is_fixed_at_construction(tiny_vila):
    """The run settings are the frozen spec's (read-only on the model); another setting is another
    model object over the same weights, and the loaded one is unchanged."""
    import dataclasses

    from edge_vlm.errors import EdgeVLMError
    from edge_vlm.run_spec import RunSpec

    model = load_model(tiny_vila, device="cpu", progress=False, max_context=256, kv_cache="int8")
    spec = model.spec
    assert (spec.max_context, spec.kv_cache_int8, spec.gguf_path, spec.llm_backend) == (256, True, None, "torch")
    assert (model.max_context, model.device, model.gguf_path) == (256, torch.device("cpu"), None)
    for name in ("max_context", "tiling", "gguf_path", "llm_threads", "s2", "image_format"):
        with pytest.raises(AttributeError):
            setattr(model, name, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(spec, "max_context", 8)  # frozen
    small = model.with_run(max_context=64, kv_cache_int8=False)
    assert small is not model and small.llm is model.llm and small.vision is model.vision
    assert small.new_engine().max_context == 64 and not small.new_engine().cache.quantized
    assert model.new_engine().max_context == 256 and model.new_engine().cache.quantized
    images = [Image.new("RGB", (40, 30), (200, 30, 90))]
    assert torch.equal(small.encode_images(images), model.encode_images(images))
    for bad in (dict(max_context=0), dict(llm_threads=0)):
        with pytest.raises(EdgeVLMError):
            RunSpec(**bad)
