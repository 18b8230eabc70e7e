"""NVILA (dynamic S2) and VILA1.5-*-s2 (fixed S2) folders end to end on the torch path.

The reference functions here are a plain reading of VILA's order of operations (mm_utils.dynamic_s2_preprocess,
llava_arch.merge_features_for_dynamic_s2 / encode_images, s2wrapper's forward, base_projector's flat_square),
run on transformers' own SiglipVisionModel and image processor: loops and explicit index arithmetic, not our
modules.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from edge_vlm import GenerationConfig
from edge_vlm.cli import main
from edge_vlm.errors import UnsupportedModelError
from edge_vlm.imaging.s2_tiling import dynamic_s2_image_tokens
from edge_vlm.loading import load_model
from edge_vlm.session import ChatSession
from tests.factories import image_processor
from tests.nvila_factory import TILE, make_nvila, make_nvila_lite, make_vila_s2

SIZES = [(100, 60), (60, 100), (42, 42), (300, 40), (40, 300), (500, 500), (77, 33), (130, 129), (20, 200)]
GRID = 3  # 42 px tower, 14 px patches


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("nvila")
    return {"nvila": (root / "nvila", make_nvila(root / "nvila")),
            "nvila_3x3_s2": (root / "nvila_3x3_s2", make_nvila(root / "nvila_3x3_s2",
                                                               projector="mlp_downsample_3x3_s2", seed=1)),
            "vila_s2": (root / "vila_s2", make_vila_s2(root / "vila_s2", seed=2)),
            "nvila_lite": (root / "nvila_lite", make_nvila_lite(root / "nvila_lite", seed=3))}


def picture(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


# ------------------------------------------------------------------ the reference, written from VILA's algorithm

def ref_aspect_grid(w, h, tile, min_num, max_num):
    """(cols, rows) as VILA's mm_utils picks an aspect grid (InternVL's rule): candidate grids by tile
    count, the closest cols/rows wins, on an exact tie the later one while the image's area exceeds
    half the grid's."""
    ratios = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if min_num <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    best, best_diff = (1, 1), float("inf")
    for i, j in ratios:
        diff = abs(w / h - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and w * h > 0.5 * tile * tile * i * j:
            best = (i, j)
    return best


def ref_grid(w, h, s0, last, max_num):
    """(cols, rows) as dynamic_s2_preprocess picks it: at least (last // s0)**2 tiles."""
    return ref_aspect_grid(w, h, s0, (last // s0) ** 2, max_num)


def ref_tiles(image, scales, max_num):
    s0, tiles, canvases = scales[0], [], []
    for s in scales[:-1]:
        canvases.append((s // s0, s // s0))
    cols, rows = ref_grid(*image.size, s0, scales[-1], max_num)
    canvases.append((rows, cols))
    for rows_, cols_ in canvases:
        canvas = image.resize((cols_ * s0, rows_ * s0))  # PIL's default resample, as VILA
        for t in range(rows_ * cols_):
            r, c = t // cols_, t % cols_
            tiles.append(canvas.crop((c * s0, r * s0, (c + 1) * s0, (r + 1) * s0)))
    return tiles, canvases


def hf_features(vision, pixels):
    with torch.no_grad():
        return vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # SigLIP: no CLS


def place(tokens_list, rows, cols, g):
    """Tiles' [g*g, C] token grids -> one [C, rows*g, cols*g] map, tile t at row t // cols, column t % cols."""
    c = tokens_list[0].shape[-1]
    out = torch.zeros(c, rows * g, cols * g)
    for t, tok in enumerate(tokens_list):
        r, col = t // cols, t % cols
        out[:, r * g:(r + 1) * g, col * g:(col + 1) * g] = tok.T.reshape(c, g, g)
    return out


def flat_square(x, k, rows_first=True):
    """base_projector's flat_square for [n, h, w, c]: pad to a multiple of k, view/permute as VILA does;
    NVILA's *_fix kinds end with one more permute (row blocks outermost), VILA1.5's did not."""
    n, w, h, c = x.shape
    pad = -w % k
    x = F.pad(x, (0, 0, 0, pad, 0, pad))
    n, w, h, c = x.shape
    x = x.reshape(n, w, h // k, c * k).permute(0, 2, 1, 3).reshape(n, h // k, w // k, c * k * k)
    if rows_first:
        x = x.permute(0, 2, 1, 3)
    return x.reshape(n, -1, c * k * k)


def ref_project(proj, kind, maps):
    """[n, C, g, g] blocks -> projected [n, t, H] through VILA's Sequential (its merge done by flat_square)."""
    k = 3 if "3x3" in kind else 2
    x = flat_square(maps.permute(0, 2, 3, 1), k, rows_first=kind != "mlp_downsample_vila15")
    with torch.no_grad():
        return proj[1:](x)


def ref_dynamic_s2(image, vision, proj, kind, scales=(42, 84, 126), max_num=12):
    tiles, canvases = ref_tiles(image, scales, max_num)
    proc = image_processor("siglip", TILE)
    pixels = torch.stack([torch.as_tensor(proc(t, return_tensors="pt")["pixel_values"][0]) for t in tiles])
    feats, at, maps = hf_features(vision, pixels), 0, []
    for rows, cols in canvases:
        maps.append(place(list(feats[at:at + rows * cols]), rows, cols, GRID))
        at += rows * cols
    size = maps[-1].shape[-2:]  # s2_resize_output_to_scale_idx -1
    merged = torch.cat([F.interpolate(m[None], size=tuple(size), mode="area")[0] for m in maps])
    rows, cols = canvases[-1]
    blocks = torch.stack([merged[:, r * GRID:(r + 1) * GRID, c * GRID:(c + 1) * GRID]
                          for r in range(rows) for c in range(cols)])
    out = ref_project(proj, kind, blocks)  # [rows*cols, t*t, H]
    side = math.isqrt(out.shape[1])
    full = torch.zeros(rows * side, cols * side, out.shape[-1])
    for b in range(rows * cols):
        r, c = b // cols, b % cols
        full[r * side:(r + 1) * side, c * side:(c + 1) * side] = out[b].reshape(side, side, -1)
    return full.reshape(-1, out.shape[-1])


def ref_fixed_s2(image, vision, proj, scales=(42, 84, 126), split=TILE, idx=0):
    proc = image_processor("siglip", scales[-1])
    x = torch.as_tensor(proc(image.resize((scales[-1], scales[-1])), return_tensors="pt")["pixel_values"])
    maps = []
    for s in scales:
        k = math.ceil(s / split)
        y = F.interpolate(F.interpolate(x, size=(s, s), mode="bicubic"), size=(k * split,) * 2, mode="bicubic")
        tiles = [y[:, :, r * split:(r + 1) * split, c * split:(c + 1) * split] for r in range(k) for c in range(k)]
        feats = hf_features(vision, torch.cat(tiles))
        merged = place(list(feats), k, k, GRID)
        side = math.ceil(s / (k * split) * merged.shape[-1])
        maps.append(F.interpolate(merged[None], size=(side, side), mode="area")[0])
    size = maps[idx].shape[-2:]
    m = torch.cat([F.interpolate(a[None], size=tuple(size), mode="area")[0] for a in maps])
    return ref_project(proj, "mlp_downsample_vila15", m[None])[0]


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("name,k", [("nvila", 2), ("nvila_3x3_s2", 3)])
def test_token_count_per_picture_follows_the_s2_tiling(folders, name, k):
    model = load_model(folders[name][0], fast_path=False, progress=False)
    per_block = math.ceil(GRID / k) ** 2
    for w, h in SIZES:
        im = picture(w, h)
        want = dynamic_s2_image_tokens(w, h, model.s2, grid_side=GRID, projector_tokens=lambda _: per_block,
                                       end_tokens=0)
        cols, rows = ref_grid(w, h, TILE, 126, 12)
        assert want == rows * cols * per_block
        assert model.image_tokens([im]) == want
        (block,) = model.encode_images([im])
        assert block.shape[0] == want
    two = model.encode_images([picture(100, 60), picture(60, 100)])  # several pictures: one tile each, no tiling
    assert [b.shape[0] for b in two] == [per_block, per_block] == [model.tokens_per_image] * 2


@pytest.mark.parametrize("name,kind", [("nvila", "mlp_downsample_2x2_fix"), ("nvila_3x3_s2", "mlp_downsample_3x3_s2")])
def test_dynamic_s2_embeddings_equal_the_reference_order(folders, name, kind):
    folder, (llm, vision, proj) = folders[name]
    model = load_model(folder, fast_path=False, progress=False)
    for w, h in [(100, 60), (40, 300), (130, 129)]:
        im = picture(w, h, seed=w)
        (ours,) = model.encode_images([im])
        ref = ref_dynamic_s2(im, vision, proj, kind)
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)  # fp32 both: summation order only


def test_fixed_s2_embeddings_equal_the_reference_order(folders):
    folder, (llm, vision, proj) = folders["vila_s2"]
    model = load_model(folder, fast_path=False, progress=False)
    im = picture(90, 50, seed=3)
    ours = model.encode_images([im])[0]
    ref = ref_fixed_s2(im, vision, proj)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    assert model.image_tokens([im]) == model.tokens_per_image == ours.shape[0] == 4


def test_nvila_prompt_puts_end_tokens_after_each_image_and_no_newline_mark(folders):
    model = load_model(folders["nvila"][0], fast_path=False, progress=False)
    s = ChatSession(model)
    content, chunks, need = s._question("What is this?", [picture(100, 60)])
    assert content == "<image>What is this?"  # NVILA's extract_media: no "\n" after the mark in the text
    nl = model.tokenizer.encode("\n")
    assert nl and chunks[1][:len(nl)] == nl  # BasicImageEncoder's end tokens follow the image's embeddings
    assert need == sum(map(len, chunks)) + 48
    vila15 = load_model(folders["vila_s2"][0], fast_path=False, progress=False)
    assert ChatSession(vila15)._question("Q", [picture(10, 10)])[0] == "<image>\nQ"  # VILA1.5 as before


@pytest.mark.parametrize("name", ["nvila", "nvila_3x3_s2", "vila_s2", "nvila_lite"])
def test_chat_answers_on_each_tiny_folder(folders, name, tmp_path, capsys):
    img = tmp_path / "p.png"
    picture(120, 70).save(img)
    args = ["chat", "--model", str(folders[name][0]), "--backend", "torch", "--temperature", "0", "--image",
            str(img), "--max-new-tokens", "5", "--quiet", "What is this?"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == out and len(out.strip()) > 0  # greedy: the same answer again


def test_info_prints_the_s2_line(folders, capsys):
    assert main(["info", str(folders["nvila"][0])]) == 0
    out = capsys.readouterr().out
    assert "S2/tiling:     dynamic S2, scales 42,84,126" in out and "9-12 tiles" in out
    assert main(["info", str(folders["vila_s2"][0])]) == 0
    assert "S2/tiling:     fixed S2, scales 42,84,126 in 42 px tiles" in capsys.readouterr().out


def ref_lite_tiles(image, s, max_num, min_num=1):
    """mm_utils.dynamic_preprocess: the aspect grid's tiles row by row, then the thumbnail when more than one."""
    cols, rows = ref_aspect_grid(*image.size, s, min_num, max_num)
    canvas = image.resize((cols * s, rows * s))
    tiles = [canvas.crop(((b % cols) * s, (b // cols) * s, (b % cols + 1) * s, (b // cols + 1) * s))
             for b in range(cols * rows)]
    return tiles + ([image.resize((s, s))] if len(tiles) != 1 else [])


def test_nvila_lite_tiles_a_lone_picture_and_writes_one_mark_per_tile(folders):
    folder, (llm, vision, proj) = folders["nvila_lite"]
    model = load_model(folder, fast_path=False, progress=False)
    proc = image_processor("siglip", TILE)
    for w, h in [(100, 60), (42, 42), (40, 300)]:
        im = picture(w, h, seed=h)
        tiles = ref_lite_tiles(im, TILE, 6)
        pixels = torch.stack([torch.as_tensor(proc(t, return_tensors="pt")["pixel_values"][0]) for t in tiles])
        feats = hf_features(vision, pixels)
        ref = ref_project(proj, "mlp_downsample_3x3_fix", feats.transpose(1, 2).reshape(len(tiles), -1, GRID, GRID))
        ours = model.encode_images(model.message_tiles([im]))
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
        s = ChatSession(model)
        content, chunks, need = s._question("Q", [im])
        nl = model.tokenizer.encode("\n")
        assert content == "<image>Q" and len(chunks) == len(tiles) + 1  # "<image>\n" per tile (mm_utils)
        assert all(c == nl + nl for c in chunks[1:-1])  # the encoder's end token, then the text's "\n"
        assert need == sum(map(len, chunks)) + len(tiles) * model.tokens_per_image
    two = [picture(100, 60), picture(40, 300)]
    assert len(model.message_tiles(two)) == 2  # several pictures: one squashed tile each, marks left as they are
    assert ChatSession(model)._question("Q", two)[0] == "<image><image>Q"


def test_unsupported_variants_are_refused_with_one_line(tmp_path, capsys):
    make_nvila(tmp_path / "lite", image_aspect_ratio="dynamic")
    with pytest.raises(UnsupportedModelError) as e:
        load_model(tmp_path / "lite", device="meta")
    assert "'dynamic'" in str(e.value) and "\n" not in str(e.value)
    capsys.readouterr()  # the factory's own progress output
    assert main(["info", str(tmp_path / "lite")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'dynamic' together with S2" in err


def test_max_tiles_trades_tokens_for_speed_and_turns_reuse_the_cache(folders):
    full = load_model(folders["nvila"][0], fast_path=False, progress=False)
    few = load_model(folders["nvila"][0], fast_path=False, progress=False, max_tiles=9)
    im = picture(100, 60)
    assert full.image_tokens([im]) == 4 * 12 and few.image_tokens([im]) == 4 * 9  # grid 4x3 -> 3x3 at 9 tiles
    assert few.encode_images([im])[0].shape[0] == 36
    s = ChatSession(full)
    from edge_vlm.generate import GenerationConfig

    gen = GenerationConfig(max_new_tokens=3, temperature=0)
    first = "".join(s.ask("What is this?", images=[im], gen=gen))
    at = s.position
    assert at >= 48 and first
    "".join(s.ask("And this?", images=[picture(60, 100)], gen=gen))
    assert s.stats.cached_prompt_tokens == at and s.position > at + 48  # the first turn stays in the cache


@pytest.mark.parametrize("name", ["nvila", "vila_s2"])
def test_the_onnx_tower_runs_every_s2_tile_and_torch_merges_and_projects(folders, name, tmp_path, monkeypatch):
    """`--vision-backend onnx` on S2 models: the exported graph is the tower alone (batched over a picture's
    tiles of every scale); the scales are merged and projected in torch, so the projector's weights stay and
    only the tower's are freed. fp32 gives the torch embeddings within float32 summation noise (1e-4 of
    their size, as test_onnx_vision's fp32 bound); the int8 file, where chosen, within its cosine bound."""
    from edge_vlm.backends.onnx import int8

    monkeypatch.setenv("EDGE_VLM_CACHE", str(tmp_path / "cache"))
    folder = folders[name][0]
    ref = load_model(folder, fast_path=False, progress=False)
    pictures = [[picture(130, 70, seed=40)], [picture(60, 90, seed=41), picture(90, 60, seed=42)]]
    want = [ref.encode_images(p) for p in pictures]
    from edge_vlm.backends.onnx import with_onnx_vision

    fp32 = with_onnx_vision(ref, "onnx", precision="fp32")
    assert fp32.info.vision_backend == "onnxruntime CPU fp32 (tower only: S2 merge and projector in torch)"
    assert fp32.encoder.tower_only
    for p, w in zip(pictures, want):
        for a, b in zip(fp32.encode_images(p), w):
            assert a.shape == b.shape and float((a - b).norm() / b.norm()) <= 1e-4
    model = load_model(folder, fast_path=False, progress=False, vision_backend="onnx")
    assert model.info.vision_backend.startswith("onnxruntime CPU")
    assert all(t.device.type == "meta" for t in model.vision.parameters())  # the tower runs in ONNX Runtime
    assert all(t.device.type == "cpu" for t in model.projector.parameters())  # the projector still in torch
    for p, w in zip(pictures, want):
        for a, b in zip(model.encode_images(p), w):
            assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) >= int8.MIN_COSINE
    session = ChatSession(model)
    session.answer("What is this?", images=pictures[0], gen=GenerationConfig(max_new_tokens=3, temperature=0))
    assert session.stats.vision_backend.startswith("onnxruntime") and session.stats.new_tokens >= 1


def test_the_servers_image_cache_keeps_a_pictures_embeddings_apart_by_its_tiling(folders):
    """Dynamic S2 tiles a picture only when it is alone in its message: the cache must not hand the
    lone picture's blocks to a message of two, and hits give blocks of different lengths as a list."""
    from edge_vlm.apps.server.image_cache import CachedImages

    model = load_model(folders["nvila"][0], fast_path=False, progress=False)
    cached = CachedImages(model.encode_images, model.images_vary_in_length, capacity=8)
    a, b = picture(100, 60, seed=1), picture(40, 90, seed=2)
    for images in ([a], [a, b], [a], [a, b]):
        got, want = cached(images), model.encode_images(images)
        assert isinstance(got, list) and [g.shape for g in got] == [w.shape for w in want]
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert cached.hits == 3 and cached.misses == 3  # the second [a] and [a, b] came from the cache
    assert cached([a])[0].shape[0] > cached([a, b])[0].shape[0]


@pytest.mark.parametrize("name", ["nvila", "vila_s2", "nvila_lite"])
def test_llama_cpp_llm_gives_the_torch_paths_logits_on_an_s2_image_prompt(folders, name, tmp_path, monkeypatch):
    """The LLM on llama.cpp (a GGUF export of the Qwen2 / Llama weights), our S2 tower beside it: the first
    logits after an image prompt agree with the torch path by cosine (llama.cpp's Q8_0 dot products, as in
    test_llamacpp_backend), and another picture moves both alike, so the per-picture blocks land where the
    torch path puts them."""
    from tests.apps.test_internvit_apps import assert_llama_cpp_image_logits_agree

    monkeypatch.setenv("EDGE_VLM_CACHE", str(tmp_path / "cache"))
    fast = load_model(folders[name][0], device="cpu", progress=False, llm_backend="llama.cpp")
    ref = load_model(folders[name][0], device="cpu", progress=False, fast_path=False)
    assert fast.info.llm_backend == "llama.cpp" and fast.gguf_path.is_file()
    assert_llama_cpp_image_logits_agree(fast, ref, picture(120, 70, seed=5), picture(60, 130, seed=6))


@pytest.mark.parametrize("name", ["nvila", "vila_s2"])
def test_quantize_calibrates_on_s2_image_tokens_and_loads_back(folders, name, tmp_path):
    """AWQ of the LLM calibrated on the runtime's own S2 image embeddings (each picture alone, between the
    image encoder's start/end tokens), the tower and projector copied bit for bit; read back, the first
    logits after an image prompt stay within int4 noise of the 16-bit model's (< 0.4 relative: the
    argument of test_quantize_pipeline's InternVL test, ~10-25% through two quantized layers)."""
    from edge_vlm import GenerationConfig
    from edge_vlm.formats.checkpoint import TensorStore
    from edge_vlm.quantize.pipeline import QuantizeSettings, quantize_checkpoint
    from tests.apps.test_internvit_apps import first_logits

    src, out, imgs = folders[name][0], tmp_path / "awq", tmp_path / "imgs"
    imgs.mkdir()
    for i, size in enumerate([(140, 90), (60, 120)]):
        picture(*size, seed=20 + i).save(imgs / f"{i}.png")
    summary = quantize_checkpoint(src, out, QuantizeSettings(calib_images=str(imgs), group_size=32, n_samples=4,
                                                             seqlen=64), progress=False)
    line = summary.calibration[-1]
    assert line.startswith("image tokens of 2 images") and ("dynamic S2" if name == "nvila" else "fixed S2") in line
    ref = load_model(src, device="cpu", progress=False, fast_path=False)
    counts = [int(n) for n in line.split("(")[1].split(" ")[0].split("+")]
    if name == "vila_s2":
        assert counts == [ref.tokens_per_image] * 2
    else:  # each picture alone, tiled as a one-picture chat tiles it, at the most tiles that fit 64 - 16 tokens
        assert all(c <= 48 for c in counts) and max(counts) > ref.tokens_per_image
    for part in ("vision_tower", "mm_projector"):
        before, after = TensorStore(src / part), TensorStore(out / part)
        assert before.keys() and sorted(before.keys()) == sorted(after.keys())
        assert all(torch.equal(before.get(k), after.get(k)) for k in before.keys())
    model = load_model(out, device="cpu", progress=False, fast_path=False)
    assert model.info.quantization == "awq w4 g32" and model.s2 == ref.s2
    img = picture(130, 80, seed=30)
    got = first_logits(ChatSession(model), "What is in the picture?", [img])
    want = first_logits(ChatSession(ref), "What is in the picture?", [img])
    err = float((got - want).norm() / want.norm())
    assert 0 < err < 0.4, err
    session = ChatSession(model)
    session.answer("What is this?", images=[img], gen=GenerationConfig(max_new_tokens=3, temperature=0))
    assert session.stats.new_tokens >= 1


def ref_video(path, vision, proj, kind, frames, pool):
    """VILA's clip path, read plainly: `frames` frames at linspace(0, n - 1).round() of the decoded clip, each
    squashed to one tower tile, its features repeated over the 3 scales (one tile: no merge), projected,
    then TSP: means over runs of t frames and h x w cells of the projected token grid."""
    import cv2
    import numpy as np

    cap, decoded = cv2.VideoCapture(str(path)), []
    while (got := cap.read())[0]:
        decoded.append(Image.fromarray(cv2.cvtColor(got[1], cv2.COLOR_BGR2RGB)))
    cap.release()
    picked = [decoded[i] for i in np.linspace(0, len(decoded) - 1, frames).round().astype(int)]
    proc = image_processor("siglip", TILE)
    pixels = torch.stack([torch.as_tensor(proc(f, return_tensors="pt")["pixel_values"][0]) for f in picked])
    feats = hf_features(vision, pixels)
    maps = torch.stack([place([f], 1, 1, GRID).repeat(3, 1, 1) for f in feats])
    tokens = ref_project(proj, kind, maps)  # [frames, side*side, H]
    t, h, w = pool
    side = math.isqrt(tokens.shape[1])
    out = []
    for start in range(0, frames, t):
        grid = tokens[start:start + t].reshape(t, side, side, -1)
        cells = [grid[:, i * h:(i + 1) * h, j * w:(j + 1) * w].reshape(-1, grid.shape[-1]).mean(0)
                 for i in range(side // h) for j in range(side // w)]
        out.append(torch.stack(cells))
    return out


@pytest.mark.parametrize("pool", [(2, 1, 1), (2, 2, 2)])
def test_nvila_video_is_sampled_and_pooled_as_the_reference(tmp_path, pool):
    """An NVILA folder with a TSPVideoEncoder: `num_video_frames` frames are sampled, each seen once, and
    every run of t frames becomes one block of the pooled grid; `--frames` that do not divide into runs are
    refused in one line."""
    import json

    from edge_vlm.errors import EdgeVLMError
    from edge_vlm.imaging.video import sample_frames
    from tests.runtime.test_vlm import write_video

    encoder = json.dumps({"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [list(pool)]})
    llm, vision, proj = make_nvila(tmp_path / "nvila", seed=4, video_encoder=encoder, num_video_frames=4)
    model = load_model(tmp_path / "nvila", fast_path=False, progress=False)
    assert model.video_frames == 4
    clip = write_video(tmp_path / "clip.mp4", frames=13, size=(80, 48))
    pictures = model.video_pictures(sample_frames(clip, model.video_frames))
    assert len(pictures) == 2 and not model.lone_image(pictures)
    side = math.isqrt(model.tokens_per_image)
    assert model.image_tokens(pictures) == 2 * (side // pool[1]) * (side // pool[2])
    ours = model.encode_images(pictures)
    ref = ref_video(clip, vision, proj, "mlp_downsample_2x2_fix", 4, pool)
    assert [b.shape for b in ours] == [r.shape for r in ref]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)  # fp32 both: summation order only
    # one image beside the clip is still its message's only image: dynamic S2 tiles it
    photo = picture(130, 70, seed=9)
    both = model.encode_images([photo] + pictures)
    assert both[0].shape[0] == model.image_tokens([photo]) > model.tokens_per_image
    with pytest.raises(EdgeVLMError, match="multiple of 2 frames"):
        model.video_pictures(sample_frames(clip, 3))


def test_vision_int8_runs_the_s2_tower_in_int8_within_its_bound(folders):
    """`--vision-int8` on NVILA: the SigLIP Linears int8 (one scale a row), the projector as loaded; the S2
    embeddings (every tile through the int8 tower, merged, projected) stay within int8 rounding of fp32's:
    each weight off by at most max|row|/254 (~0.5% of a Gaussian row's weight), independent over the tower's
    Linears and damped by the residual stream, so < 2% relative (a wrong scale gives ~100%), and > 1e-4
    shows the weights really are int8."""
    from edge_vlm.formats.int8_rows import Int8Linear

    folder = folders["nvila"][0]
    ref = load_model(folder, device="cpu", progress=False, fast_path=False)
    q = load_model(folder, device="cpu", progress=False, fast_path=False, vision_int8=True)
    assert q.info.vision_quantization == "int8" and q.s2 == ref.s2
    linears = [m for m in q.vision.modules() if isinstance(m, (Int8Linear, torch.nn.Linear))]
    assert linears and all(isinstance(m, Int8Linear) for m in linears)
    assert not any(isinstance(m, Int8Linear) for m in q.projector.modules())
    for pictures in ([picture(130, 70, seed=11)], [picture(60, 90, seed=12), picture(90, 60, seed=13)]):
        for a, b in zip(q.encode_images(pictures), ref.encode_images(pictures)):
            assert a.shape == b.shape
            err = float((a - b).norm() / b.norm())
            assert 1e-4 < err < 0.02, err
