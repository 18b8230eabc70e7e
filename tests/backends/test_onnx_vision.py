"""The vision tower + projector on ONNX Runtime vs the torch tower, the choice between them, and its fallbacks.

Tolerances, against `encode_images` on the plain torch modules (fp32), on fresh random images through
the model's real preprocessing:
- fp32: 1e-4 relative (max error over max value), as the torch towers are held to against transformers:
  both sides compute in fp32 (ORT fuses and reorders sums, ~1e-6 measured).
- fp16: FP16_REL, 16 units of fp16 rounding (u = 2^-11). Every stage rounds its output to fp16 (about
  4 per layer through the residual stream, plus the projector), and independent roundings add in
  quadrature: ~sqrt(16) u for these 2-3-layer towers is expected; 16 u leaves 4x for accumulation
  order and GELU/LayerNorm evaluated in fp16. Measured: ~1e-3 (see the test's message).
- int8: cosine >= 0.99 to fp32 (int8.MIN_COSINE, what the runtime itself requires of the file).
"""

from __future__ import annotations

import shutil
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch

# onnx and onnxruntime are in the [test] extra: without them this module fails, it does not skip
import onnx
import onnxruntime as ort

from edge_vlm import load_model
from edge_vlm.backends.onnx import (
    OnnxFallbackWarning, OnnxInt8RefusedWarning, OnnxVisionEncoder, export_vision, release_torch_tower, with_onnx_vision)
from edge_vlm.cli import build_parser
from edge_vlm.backends.onnx import cache, choice, export, int8, providers
from edge_vlm.errors import EdgeVLMError
from edge_vlm.generate import GenerationStats
from tests.factories import make_llm, make_vila

FP32_REL = 1e-4
FP16_REL = 16 * 2.0 ** -11
CPU_PLAN = lambda precision: providers.ProviderPlan([(providers.CPU, {})], precision)  # noqa: E731


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def fresh_images(n: int, seed: int) -> list[np.ndarray]:
    """Random RGB arrays of odd sizes and aspect ratios, so resizing and cropping really run."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (int(rng.integers(20, 120)), int(rng.integers(20, 120)), 3), dtype=np.uint8)
            for _ in range(n)]


@pytest.fixture(scope="module")
def vila_clip_linear(tmp_path_factory):
    """A VILA folder with a CLIP tower (CLS kept: "cls_patch") and a linear projector, at 56 px."""
    folder = tmp_path_factory.mktemp("models") / "vila-clip-linear"
    make_vila(folder, projector="linear", vision_kind="clip", image_size=56)
    return folder


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("edge-vlm-cache")


@pytest.fixture(autouse=True)
def own_cache(cache_root, monkeypatch):
    """Exports go to a folder of this module's, never into the shared tiny model folders."""
    monkeypatch.setenv("EDGE_VLM_CACHE", str(cache_root))


def load(folder):
    return load_model(folder, device="cpu", progress=False, fast_path=False)


CASES = {"siglip+mlp_downsample (VILA)": "tiny_vila", "clip+mlp2x_gelu (LLaVA, CLS dropped)": "tiny_llava",
         "clip+linear (VILA, CLS kept)": "vila_clip_linear"}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    model = load(request.getfixturevalue(CASES[request.param]))
    out = tmp_path_factory.mktemp("onnx")
    files = export_vision(model, out)
    return request.param, model, files, export.read_manifest(out)


def test_export_writes_checked_files_with_a_dynamic_batch_axis(exported):
    _, model, files, manifest = exported
    assert sorted(files) == ["fp16", "fp32", "int8"] == sorted(manifest["precisions"])
    assert manifest["tokens"] == model.tokens_per_image and manifest["hidden"] == model.llm.cfg.hidden_size
    for precision, path in files.items():
        onnx.checker.check_model(str(path), full_check=True)
        graph = onnx.load(str(path), load_external_data=False).graph
        (pixels,) = graph.input
        dims = pixels.type.tensor_type.shape.dim
        side = model.vision.cfg.image_size
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, side, side], precision
    assert not [p for p in files["fp32"].parent.iterdir() if p.name.startswith(".export-")]  # no temporary left


def test_onnx_features_match_the_torch_tower(exported):
    case, model, files, manifest = exported
    images = fresh_images(3, seed=zlib.crc32(case.encode()))  # not the images the int8 file was judged on
    ref = model.encode_images(images)
    got = {p: OnnxVisionEncoder.open(files[p], model.image_cfg, CPU_PLAN(p), "cpu", model.dtype)(images)
           for p in files}
    assert all(g.shape == ref.shape and g.dtype == ref.dtype for g in got.values())
    fp32, fp16, cos8 = rel_err(got["fp32"], ref), rel_err(got["fp16"], ref), int8.cosine(got["int8"], ref)
    print(f"\n{case}: fp32 rel {fp32:.2e}, fp16 rel {fp16:.2e} (bound {FP16_REL:.2e}), int8 cosine {cos8:.5f} "
          f"(at export: {manifest['int8']['cosine']:.5f})")
    assert fp32 <= FP32_REL
    assert fp16 <= FP16_REL
    assert cos8 >= int8.MIN_COSINE and manifest["int8"]["cosine"] >= int8.MIN_COSINE
    # one image alone and a batch give the same features (the batch axis is really dynamic)
    alone = OnnxVisionEncoder.open(files["fp32"], model.image_cfg, CPU_PLAN("fp32"), "cpu", model.dtype)(images[1:2])
    assert rel_err(alone[0], ref[1]) <= FP32_REL


def test_large_batches_run_in_chunks_with_the_same_features(exported):
    _, model, files, _ = exported
    session = OnnxVisionEncoder.open(files["fp32"], model.image_cfg, CPU_PLAN("fp32"), "cpu", model.dtype).session
    whole = OnnxVisionEncoder(session, model.image_cfg, "fp32", "cpu", model.dtype)
    chunked = OnnxVisionEncoder(session, model.image_cfg, "fp32", "cpu", model.dtype, max_batch=2)
    images = fresh_images(5, seed=7)
    assert torch.equal(whole(images), chunked(images))


def test_static_int8_is_made_and_judged_the_same_way(tiny_vila, tmp_path):
    model = load(tiny_vila)
    files = export_vision(model, tmp_path, precisions=["int8"], int8_method="static")
    assert sorted(files) == ["int8"] and not (tmp_path / "vision-fp32.onnx").exists()
    manifest = export.read_manifest(tmp_path)
    assert manifest["int8"]["method"] == "static"
    static_nodes = {n.op_type for n in onnx.load(str(files["int8"]), load_external_data=False).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= static_nodes  # QDQ: activation ranges from calibration
    images = fresh_images(2, seed=3)
    got = OnnxVisionEncoder.open(files["int8"], model.image_cfg, CPU_PLAN("int8"), "cpu", model.dtype)(images)
    print(f"\nstatic int8 cosine {int8.cosine(got, model.encode_images(images)):.5f}, "
          f"at export {manifest['int8']['cosine']:.5f}")
    assert 0 < manifest["int8"]["cosine"] <= 1 + 1e-9


def test_export_rejects_unknown_precisions_and_text_only_models(tiny_vila, tmp_path):
    model = load(tiny_vila)
    with pytest.raises(ValueError, match="precisions"):
        export_vision(model, tmp_path, precisions=["int4"])
    make_llm(tmp_path / "llm")
    with pytest.raises(EdgeVLMError, match="text-only"):
        export_vision(load(tmp_path / "llm"), tmp_path / "out")


# ------------------------------------------------------------------ attaching, choosing, falling back

def count(caught, category=Warning) -> int:
    return sum(issubclass(w.category, category) for w in caught)


def attach(model, mode="onnx", **kw):
    """(what runs the tower, the warnings, the model with that vision path); `model` is left as it was."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = with_onnx_vision(model, mode, **kw)
    assert chosen is not model and model.info.vision_backend == "torch" and model.encoder is None
    return chosen.info.vision_backend, caught, chosen


def test_onnx_mode_exports_once_into_the_cache_and_encodes_through_the_model(tiny_vila, cache_root, monkeypatch):
    model = load(tiny_vila)
    images = fresh_images(2, seed=11)
    ref = model.encode_images(images)
    chosen, caught, onnx = attach(model, "onnx", precision="fp32")
    assert chosen == "onnxruntime CPU fp32" and count(caught) == 0
    assert onnx.encoder.provider == providers.CPU
    assert rel_err(onnx.encode_images(images), ref) <= FP32_REL  # the model's own entry point uses it
    folder = cache.export_dir(model)
    assert folder.is_relative_to(cache_root) and (folder / "vision-fp32.onnx").is_file()

    def no_export(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr(cache, "export_parts", no_export)
    assert attach(load(tiny_vila), "onnx", precision="fp32")[0] == "onnxruntime CPU fp32"  # second start: no export


def test_cpu_onnx_mode_uses_int8_unless_its_features_moved_too_far(tiny_llava, monkeypatch):
    model = load(tiny_llava)
    assert attach(model, "onnx")[0] == "onnxruntime CPU int8"
    low = dict(export.read_manifest(cache.export_dir(model)))
    low["int8"] = {**low["int8"], "cosine": 0.5}
    monkeypatch.setattr(cache, "read_manifest", lambda folder: low)
    chosen, caught, attached = attach(model, "onnx")
    assert chosen == "onnxruntime CPU fp32 (int8 refused: cosine 0.5000 < bound 0.99)"
    assert count(caught, OnnxFallbackWarning) == 0 and count(caught) == 1  # one line, and it says why
    assert [str(w.message) for w in caught if issubclass(w.category, OnnxInt8RefusedWarning)] == ["ONNX vision: the int8 tower's features have cosine 0.5000 to fp32, below the bound 0.99; "
                       "running the fp32 file"]
    # the stats line after an answer names the refusal too
    stats = GenerationStats(prompt_tokens=1, new_tokens=1, vision_backend=chosen)
    assert "vision on onnxruntime CPU fp32 (int8 refused: cosine 0.5000 < bound 0.99)" in stats.summary()
    # an int8 file above the bound: no warning, no note
    monkeypatch.setattr(cache, "read_manifest", lambda folder: {**low, "int8": {**low["int8"], "cosine": 0.995}})
    chosen, caught, attached = attach(model, "onnx")
    assert chosen == "onnxruntime CPU int8" and not caught


def test_torch_mode_and_text_only_models_keep_the_torch_path(tiny_vila, tmp_path):
    model = load(tiny_vila)
    assert attach(model, "torch")[:2] == ("torch", [])
    assert attach(model, "torch")[2].encoder is None
    make_llm(tmp_path / "llm")
    assert attach(load(tmp_path / "llm"), "onnx")[:2] == ("torch", [])
    with pytest.raises(ValueError, match="vision backend"):
        with_onnx_vision(model, "tensorrt")


def test_auto_follows_the_measured_int8_speedup(tiny_vila, monkeypatch):
    measured = choice.cpu_int8_speedup(9, 48, 80)  # the real probe, at the tiny tower's shapes
    assert np.isfinite(measured) and measured > 0
    model = load(tiny_vila)
    monkeypatch.setattr(choice, "cpu_int8_speedup", lambda *a: choice.AUTO_MIN_SPEEDUP)
    assert attach(model, "auto")[0] == "onnxruntime CPU int8"
    monkeypatch.setattr(choice, "cpu_int8_speedup", lambda *a: choice.AUTO_MIN_SPEEDUP * 0.9)
    chosen, caught, kept = attach(model, "auto")
    assert (chosen, caught) == ("torch", []) and kept.encoder is None


def test_load_model_with_onnx_frees_the_torch_tower(tiny_vila, cache_root):
    """Through load_model, once ONNX Runtime encodes the images the torch tower's weights are gone
    (on the meta device), the answer still comes, and the fallback keeps the torch tower whole."""
    from edge_vlm import ChatSession, GenerationConfig

    ref = load(tiny_vila)
    images = fresh_images(1, seed=21)
    want = ref.encode_images(images)
    model = load_model(tiny_vila, device="cpu", progress=False, vision_backend="onnx")
    assert model.encoder is not None and model.info.vision_backend.startswith("onnxruntime CPU")
    assert all(p.device.type == "meta" for m in (model.vision, model.projector) for p in m.parameters())
    assert int8.cosine(model.encode_images(images), want) >= int8.MIN_COSINE
    session = ChatSession(model)
    session.answer("what is this?", images=images, gen=GenerationConfig(max_new_tokens=3, temperature=0))
    assert session.stats.vision_backend.startswith("onnxruntime")
    kept = with_onnx_vision(ref, "torch")
    assert kept.info.vision_backend == "torch" and release_torch_tower(kept) == 0  # the torch path keeps it
    assert all(p.device.type == "cpu" for p in ref.vision.parameters())


def assert_fell_back(model, caught, reason: str, images):
    assert count(caught) == 1 and count(caught, OnnxFallbackWarning) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert reason in message and "using the torch tower" in message and "\n" not in message
    assert model.encoder is None
    assert torch.equal(model.encode_images(images), model.encode_images(images))  # the torch tower answers


def test_missing_onnxruntime_falls_back_with_one_warning(tiny_vila, monkeypatch):
    model = load(tiny_vila)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    chosen, caught, attached = attach(model, "onnx")
    assert chosen == "torch"
    assert_fell_back(attached, caught, "onnxruntime is not installed", fresh_images(1, 0))
    assert attach(model, "auto")[:2] == ("torch", [])  # auto never asked for it: no warning


def test_failed_export_falls_back_with_one_warning_and_leaves_nothing(tiny_vila, tmp_path, monkeypatch):
    folder = tmp_path / "vila"
    shutil.copytree(tiny_vila, folder)
    model = load(folder)

    def broken(*a, **k):
        raise RuntimeError("exporter exploded\nwith a long traceback")

    monkeypatch.setattr(torch.onnx, "export", broken)
    chosen, caught, attached = attach(model, "onnx")
    assert chosen == "torch"
    assert_fell_back(attached, caught, "export failed: RuntimeError: exporter exploded", fresh_images(1, 0))
    out = cache.export_dir(model)
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_corrupt_onnx_file_falls_back_with_one_warning(tiny_vila, tmp_path):
    folder = tmp_path / "vila"
    shutil.copytree(tiny_vila, folder)
    model = load(folder)
    assert attach(model, "onnx")[0] == "onnxruntime CPU int8"
    path = cache.export_dir(model) / "vision-int8.onnx"
    path.write_bytes(b"\x08\x07this is not a protobuf" * 10)
    again = load(folder)
    chosen, caught, attached = attach(again, "onnx")
    assert chosen == "torch"
    assert_fell_back(attached, caught, "failed to start", fresh_images(1, 0))
    assert str(path.parent) in str(caught[0].message)  # says which folder to delete


def test_provider_that_raises_at_session_start_falls_back_with_one_warning(tiny_vila, monkeypatch):
    model = load(tiny_vila)
    real = ort.InferenceSession

    def failing(path, opts=None, providers=None, **kw):
        real(path, opts, providers=providers, **kw)  # the file itself is fine
        raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")

    monkeypatch.setattr(ort, "InferenceSession", failing)
    chosen, caught, attached = attach(model, "onnx")
    assert chosen == "torch"
    assert_fell_back(attached, caught, "CUDA failure 100", fresh_images(1, 0))


def test_a_gpu_model_without_a_gpu_provider_stays_on_torch():
    assert providers.plan("cuda:0", [providers.CPU], "/c", 384) is None
    assert providers.plan("meta", [providers.CPU], "/c", 384) is None


def test_provider_plans_prefer_tensorrt_then_cuda(tmp_path):
    every = [providers.TRT, providers.CUDA, providers.CPU]
    trt = providers.plan("cuda:1", every, tmp_path, 384, device_name="Orin (nvgpu)", ort_version="1.20.0")
    assert [p for p, _ in trt.providers] == every and trt.precision == "fp32" and trt.max_batch == 16
    opts = trt.providers[0][1]
    assert opts["trt_fp16_enable"] and opts["trt_engine_cache_enable"] and opts["device_id"] == 1
    engines = tmp_path / "tensorrt" / "Orin-nvgpu-ort1.20.0"
    assert opts["trt_engine_cache_path"] == str(engines) == opts["trt_timing_cache_path"]
    assert opts["trt_profile_max_shapes"] == "pixels:16x3x384x384"
    cuda = providers.plan("cuda", [providers.CUDA, providers.CPU], tmp_path, 384)
    assert [p for p, _ in cuda.providers] == [providers.CUDA, providers.CPU] and cuda.precision == "fp16"
    cpu = providers.plan("cpu", every, tmp_path, 384, cpu_precision="int8")
    assert cpu.providers == [(providers.CPU, {})] and cpu.precision == "int8"


# ------------------------------------------------------------------ where the export lives

def test_cache_folder_beside_a_local_model_or_in_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGE_VLM_CACHE")
    local = tmp_path / "my-vila"
    local.mkdir()
    assert cache.model_cache_dir(local) == local / ".edge-vlm"
    snapshot = tmp_path / "hub" / "models--Org--VILA" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert cache.model_cache_dir(snapshot) == tmp_path / "hub" / "models--Org--VILA" / "edge-vlm" / "abc123"
    monkeypatch.setattr(cache, "_writable", lambda folder: False)  # a read-only model folder
    monkeypatch.setattr(cache.Path, "home", staticmethod(lambda: tmp_path / "home"))
    assert cache.model_cache_dir(local).parent == tmp_path / "home" / ".cache" / "edge-vlm"


def test_first_use_exports_beside_a_local_model_and_changed_weights_export_again(tiny_vila, tmp_path, monkeypatch):
    monkeypatch.delenv("EDGE_VLM_CACHE")
    folder = tmp_path / "vila"
    shutil.copytree(tiny_vila, folder)
    model = load(folder)
    assert attach(model, "onnx", precision="fp32")[0] == "onnxruntime CPU fp32"
    first = cache.export_dir(model)
    assert first.parent == folder / ".edge-vlm" / "onnx" and (first / "vision-fp32.onnx").is_file()
    weights = folder / "mm_projector" / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, new mtime: treated as changed weights
    assert cache.export_dir(load(folder)) != first


# ------------------------------------------------------------------ the CLI function

def parse(argv):
    """`edge-vlm export onnx ARGV` as the CLI parses it."""
    return build_parser().parse_args(["export", "onnx", *argv])


def run_export(args) -> int:
    return args.func(args)


def test_export_cli_writes_the_requested_files(tiny_llava, tmp_path, capsys):
    assert run_export(parse([str(tiny_llava), str(tmp_path / "out")])) == 0
    printed = capsys.readouterr().out
    for precision in ("fp32", "fp16", "int8"):
        path = tmp_path / "out" / f"vision-{precision}.onnx"
        assert f"{precision}: {path}" in printed
        onnx.checker.check_model(str(path))
    assert "feature cosine to fp32" in printed
    assert run_export(parse([str(tiny_llava), str(tmp_path / "gpu"), "--precision", "fp16"])) == 0
    assert sorted(p.name for p in (tmp_path / "gpu").glob("*.onnx")) == ["vision-fp16.onnx"]


def test_export_cli_errors_are_one_line(tiny_llava, tmp_path, monkeypatch):
    make_llm(tmp_path / "llm")
    with pytest.raises(EdgeVLMError, match="text-only"):
        run_export(parse([str(tmp_path / "llm"), str(tmp_path / "out")]))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(EdgeVLMError, match=r"pip install 'edge-vlm\[onnx\]'"):
        run_export(parse([str(tiny_llava), str(tmp_path / "out")]))
    with pytest.raises(SystemExit):
        parse([str(tiny_llava), str(tmp_path), "--precision", "int4"])


# ------------------------------------------------------------------ the real LLM answers the same

@pytest.mark.slow
def test_real_smollm2_answers_an_image_question_identically_through_the_onnx_tower(smollm2, tmp_path, monkeypatch):
    from skimage import data

    from edge_vlm import ChatSession, GenerationConfig, session as session_module

    answers = []

    class Recorded(session_module.AnswerText):  # keeps every answer's token ids
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            answers.append(self)

    monkeypatch.setattr(session_module, "AnswerText", Recorded)
    # the VILA1.5 geometry (384 px, 729 patches -> 196 tokens) on a narrow random SigLIP, real SmolLM2
    make_vila(tmp_path / "vila", llm_folder=smollm2, image_size=384, patch_size=14, hidden_size=64,
              intermediate_size=96, num_hidden_layers=3)
    model = load_model(tmp_path / "vila", device="cpu", progress=False)
    question, image = "What is in this picture?", data.chelsea()
    gen = GenerationConfig(max_new_tokens=16, temperature=0)
    torch_answer = ChatSession(model).answer(question, images=[image], gen=gen)
    assert attach(model, "onnx", precision="fp32")[0] == "onnxruntime CPU fp32"
    onnx_answer = ChatSession(model).answer(question, images=[image], gen=gen)
    torch_tokens, onnx_tokens = (a.tokens for a in answers)
    assert onnx_tokens == torch_tokens and len(torch_tokens) > 0 and onnx_answer == torch_answer


# ------------------------------------------------------------------ the benchmark's own arithmetic

@pytest.mark.parametrize("name", ["tiny", "vila1.5-3b", "nemotron-mini-4b"])
def test_benchmark_flop_count_matches_torchs_flop_counter(name):
    from torch.utils.flop_counter import FlopCounterMode

    from edge_vlm.benchmarks.vision_backends import random_parts, tower_flops

    tower, projector = random_parts(name, layers=3)  # 2 layers used; the count is per layer plus the ends
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the math backend: attention as matmuls the counter sees (it has no formula for the CPU flash kernel)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        projector(tower(torch.zeros(1, 3, tower.cfg.image_size, tower.cfg.image_size)))
    assert tower_flops(tower, projector) == counter.get_total_flops()


def test_benchmark_runs_every_backend_on_the_tiny_tower(capsys):
    from edge_vlm.benchmarks.vision_backends import main

    main(["--model-shape", "tiny"])
    out = capsys.readouterr().out
    for row in ("| torch fp32 |", "| ORT fp32 |", "| ORT int8 dynamic |", "| ORT int8 static |", "| torch bf16 |"):
        assert row in out
    assert "physical floor (fp32)" in out and "peak fp32 FMA" in out


@pytest.mark.slow  # a benchmark check: every backend pair on the real SmolLM2
def test_image_question_benchmark_runs_each_backend_pair(smollm2, capsys):
    """The TTFT benchmark of a 1-image question (a 2-layer real-width SigLIP tower here): every row is a
    real session through the backends it names."""
    from edge_vlm.benchmarks.image_question import main

    main(["--layers", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "LLM on torch, vision on torch" in out and "LLM on llama.cpp, vision on torch" in out
    assert "LLM on llama.cpp, vision on onnxruntime CPU int8" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and " ms |" in line]
    assert len(rows) == 3 and all(float(r.split("|")[2].split()[0]) > 0 for r in rows)
