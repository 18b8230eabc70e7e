"""`edge-vlm quantize`: AWQ and RTN on tiny checkpoints of every supported architecture.

Quality claims are tested where they must hold: with a few planted outlier input channels
AWQ's output error is clearly below RTN's; scale folding is exact in fp32 (Qwen2 bias,
Nemotron LayerNorm1P and squared ReLU, GQA v->o); the written files decode, with a reference
unpacker written here from the AutoAWQ definition, to the weights the runtime uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edge_vlm.errors import EdgeVLMError, UnsupportedModelError
from edge_vlm.quantize.pipeline import QuantizeError, QuantizeSettings, quantize_checkpoint
from tests.awq_reference import awq_unpack

FAST = dict(n_samples=4, seqlen=64)
def _llm(folder: Path, kind="llama", seed=0, **over):
    from tests.factories import make_llm

    over.setdefault("intermediate_size", 128)
    over.setdefault("num_hidden_layers", 2)
    return make_llm(folder, kind, seed, **over)


def _logits(folder, ids) -> torch.Tensor:
    from edge_vlm import load_model

    llm = load_model(folder, device="cpu", progress=False, fast_path=False).llm  # the reference modules
    return llm(llm.embed(ids), llm.new_cache(ids.shape[1]), all_logits=True)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny Llama and its AWQ output (group 32), shared by the layout tests."""
    root = tmp_path_factory.mktemp("awq")
    _llm(root / "src", "llama")
    summary = quantize_checkpoint(root / "src", root / "out", QuantizeSettings(group_size=32, **FAST), progress=False)
    return root / "src", root / "out", summary


def test_output_config_and_tensor_layout(tiny_pair):
    src, out, summary = tiny_pair
    conf = json.loads((out / "config.json").read_text())
    assert conf["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                           "version": "gemm", "modules_to_not_convert": ["lm_head"]}
    # transformers parses it as AWQ GEMM (loading the weights there needs gptqmodel, not installable here)
    from transformers import AwqConfig

    parsed = AwqConfig.from_dict(conf["quantization_config"])
    assert (parsed.format, parsed.bits, parsed.group_size, parsed.zero_point) == ("gemm", 4, 32, True)
    from edge_vlm.formats.checkpoint import TensorStore

    store = TensorStore(out)
    qw = store.get("model.layers.0.mlp.down_proj.qweight")  # K = intermediate 128, N = hidden 64
    assert qw.dtype == torch.int32 and qw.shape == (128, 8)
    assert store.get("model.layers.0.mlp.down_proj.qzeros").shape == (4, 8)
    sc = store.get("model.layers.0.mlp.down_proj.scales")
    assert sc.dtype == torch.float16 and sc.shape == (4, 64)
    assert "model.layers.0.mlp.down_proj.weight" not in store and "lm_head.weight" in store
    assert (out / "tokenizer.json").is_file() and not (out.parent / "out.partial").exists()
    assert summary.bytes_after < summary.bytes_before


def test_written_weights_decode_by_reference_to_a_close_approximation(tiny_pair, tmp_path):
    """With --rounding rtn, reference-unpacked (q - z) * s must be the AWQ-scaled weight up to half a
    step (q is never clipped); GPTQ rounding moves weights by more (its error compensation) but stays
    near them."""
    from edge_vlm.formats.checkpoint import TensorStore

    src, _, _ = tiny_pair
    out = tmp_path / "rtn-rounding"
    quantize_checkpoint(src, out, QuantizeSettings(group_size=32, rounding="rtn", **FAST), progress=False)
    orig, quant = TensorStore(src), TensorStore(out)
    name = "model.layers.1.self_attn.q_proj"  # q: never clipped, only scaled by AWQ (folded into the norm)
    q = awq_unpack(quant.get(name + ".qweight"))
    z = awq_unpack(quant.get(name + ".qzeros")).repeat_interleave(32, 0)
    s = quant.get(name + ".scales").float().repeat_interleave(32, 0)
    w_q = ((q - z) * s).t()  # [N, K]
    assert q.min() >= 0 and q.max() <= 15
    norm_ratio = quant.get("model.layers.1.input_layernorm.weight").float() / orig.get(
        "model.layers.1.input_layernorm.weight").float()  # = 1/s_awq per input channel
    w = orig.get(name + ".weight").float() / norm_ratio[None, :]  # the weight AWQ quantized (W * s)
    assert (w_q - w).abs().max() <= 0.5 * s.max() * 1.01  # round-to-nearest within half a step (fp16 scales)


def test_runtime_logits_equal_reference_dequantized_model(tiny_pair):
    """The runtime's WQLinear path == a dense model holding the reference-decoded weights."""
    from edge_vlm import load_model
    from edge_vlm.formats.checkpoint import TensorStore

    _, out, _ = tiny_pair
    store = TensorStore(out)
    ids = torch.randint(0, 380, (1, 20), generator=torch.Generator().manual_seed(1))
    got = _logits(out, ids)
    dense_cfg = json.loads((out / "config.json").read_text())
    dense_cfg.pop("quantization_config")
    dense = load_model(out, device="meta", progress=False)  # shape source only
    assert dense.llm.cfg.hidden_size == 64
    from edge_vlm.formats.configs import LLMConfig
    from edge_vlm.models.llm import DecoderLM

    llm = DecoderLM(LLMConfig.from_hf(dense_cfg)).eval()
    sd = {}
    for key in store.keys():
        k = key[len("model."):] if key.startswith("model.") else key
        if key.endswith(".qweight"):
            base = key[: -len(".qweight")]
            q, z = awq_unpack(store.get(key)), awq_unpack(store.get(base + ".qzeros"))
            s = store.get(base + ".scales").float()
            sd[k[: -len(".qweight")] + ".weight"] = ((q - z.repeat_interleave(32, 0)) * s.repeat_interleave(32, 0)).t()
        elif not key.endswith((".qzeros", ".scales")):
            sd[k] = store.get(key).float()
    llm.load_state_dict(sd, strict=True)
    want = llm(llm.embed(ids), llm.new_cache(20), all_logits=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # fp32, same values: summation order only


def _plant_outliers(folder: Path, channels=(3, 17, 40), factor=25.0) -> None:
    """Make a few hidden channels carry large activations, as real LLMs do."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    sd = load_file(str(path))
    for key in sd:
        if key.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            sd[key][list(channels)] *= factor
    save_file(sd, str(path), metadata={"format": "pt"})


def test_awq_beats_rtn_with_planted_outlier_channels(tmp_path):
    from edge_vlm.quantize.calibration import held_out_text
    from edge_vlm.text.tokenizer import Tokenizer

    _llm(tmp_path / "src", "llama", seed=3, num_hidden_layers=2)
    _plant_outliers(tmp_path / "src")
    common = dict(group_size=64, **FAST)
    quantize_checkpoint(tmp_path / "src", tmp_path / "rtn", QuantizeSettings(method="rtn", **common), progress=False)
    quantize_checkpoint(tmp_path / "src", tmp_path / "awq", QuantizeSettings(method="awq", **common), progress=False)
    ids = torch.tensor([Tokenizer(tmp_path / "src").encode(held_out_text())[:256]])  # never calibrated on
    ref = _logits(tmp_path / "src", ids)
    err = {m: float((_logits(tmp_path / m, ids) - ref).pow(2).mean()) for m in ("rtn", "awq")}
    assert err["awq"] < 0.7 * err["rtn"], err


@pytest.mark.parametrize("kind", ["qwen2", "nemotron"])
def test_other_architectures_quantize_and_stay_close(tmp_path, kind):
    """Qwen2 (q/k/v bias moves with the scales) and Nemotron (LayerNorm1P, relu^2) end to end."""
    _llm(tmp_path / "src", kind, seed=1)
    quantize_checkpoint(tmp_path / "src", tmp_path / "out", QuantizeSettings(**FAST), progress=False)  # auto group
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["quantization_config"]["group_size"] == 64  # hidden 64: 128 does not fit
    ids = torch.randint(0, 380, (1, 24), generator=torch.Generator().manual_seed(2))
    ref, got = _logits(tmp_path / "src", ids), _logits(tmp_path / "out", ids)
    rel = float((got - ref).norm() / ref.norm())
    # 4-bit noise of a random 2-layer model measured on random token ids: RTN gives 0.23-0.26 here; a
    # wrong fold (a bias or the LayerNorm1P +1 left behind) gives errors of order 1
    assert rel < 0.4, rel


@pytest.mark.parametrize("kind", ["llama", "qwen2", "nemotron"])
def test_scale_folding_is_exact(kind):
    """Folding random scales changes no output: norm->qkv, v->o (GQA), norm->gate/up, up->down."""
    from edge_vlm.formats.configs import LLMConfig
    from edge_vlm.models.llm import DecoderLayer
    from edge_vlm.quantize.awq import LayerRunner, scale_columns, scale_groups
    from tests.factories import llm_config

    torch.manual_seed(0)
    cfg = LLMConfig.from_hf(llm_config(kind, intermediate_size=128).to_dict())
    layer = DecoderLayer(cfg).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(0.1 * torch.randn(p.shape))
    runner = LayerRunner(cfg, 16, "cpu")
    x = torch.randn(2, 16, cfg.hidden_size)
    before = runner(layer, x)
    for group in scale_groups(layer, cfg):  # the folds AWQ applies, with random scales
        linears = [layer.get_submodule(n) for n in group.names]
        s = group.tie(torch.rand(linears[0].in_features) + 0.5)
        group.fold(s)
        scale_columns(linears, s)
    torch.testing.assert_close(runner(layer, x), before, rtol=1e-4, atol=1e-5)  # fp32 re-association only


def test_rtn_needs_no_calibration_and_differs_from_awq(tiny_pair, tmp_path):
    src, awq_out, _ = tiny_pair
    quantize_checkpoint(src, tmp_path / "rtn", QuantizeSettings(method="rtn", group_size=32), progress=False)
    from edge_vlm.formats.checkpoint import TensorStore

    a, r = TensorStore(awq_out), TensorStore(tmp_path / "rtn")
    key = "model.layers.0.mlp.up_proj.scales"
    assert a.get(key).shape == r.get(key).shape and not torch.equal(a.get(key), r.get(key))


def test_existing_output_is_refused_unless_force(tiny_pair, tmp_path):
    src, _, _ = tiny_pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(QuantizeError, match="already exists.*--force"):
        quantize_checkpoint(src, out, QuantizeSettings(method="rtn", group_size=32), progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    quantize_checkpoint(src, out, QuantizeSettings(method="rtn", group_size=32), force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def dies_on_layer_1(layer_step):
    """`layer_step` (quantize_layer_awq) that raises KeyboardInterrupt on its second call, as Ctrl-C
    during layer 1 would: the run keeps layer 0 for --resume."""
    calls = {"n": 0}

    def step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return layer_step(*a, **k)

    return step


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    import edge_vlm.quantize.awq as awq
    import edge_vlm.quantize.pipeline as pipeline

    _llm(tmp_path / "src", "llama", seed=4, num_hidden_layers=2)
    settings = QuantizeSettings(group_size=32, **FAST)
    quantize_checkpoint(tmp_path / "src", tmp_path / "whole", settings, progress=False)

    real = awq.quantize_layer_awq
    monkeypatch.setattr(pipeline, "quantize_layer_awq", dies_on_layer_1(real))
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(tmp_path / "src", tmp_path / "out", settings, progress=False)
    assert not (tmp_path / "out").exists()  # never a half checkpoint under the real name
    assert (tmp_path / "out.partial" / "resume" / "layer-000.safetensors").is_file()
    with pytest.raises(QuantizeError, match="--resume"):
        quantize_checkpoint(tmp_path / "src", tmp_path / "out", settings, progress=False)
    monkeypatch.setattr(pipeline, "quantize_layer_awq", real)
    summary = quantize_checkpoint(tmp_path / "src", tmp_path / "out", settings, resume=True, progress=False)
    assert len(summary.layer_losses) == 2
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "out" / "resume").exists() and not (tmp_path / "out" / "progress.json").exists()


def test_bad_inputs_are_one_line_errors_and_write_nothing(tiny_pair, tmp_path):
    src, _, _ = tiny_pair
    out = tmp_path / "out"
    cases = [
        (QuantizeSettings(n_samples=10_000, seqlen=512), "calibration text too short"),
        (QuantizeSettings(calib=str(tmp_path / "nope.txt"), **FAST), "calibration file not found"),
        (QuantizeSettings(group_size=128, **FAST), "not a multiple of --group-size 128.*--group-size 64"),
        (QuantizeSettings(calib_images=str(tmp_path), **FAST), "needs a vision-language model"),
    ]
    for settings, match in cases:
        with pytest.raises(EdgeVLMError, match=match) as e:
            quantize_checkpoint(src, out, settings, progress=False)
        assert "\n" not in str(e.value)
        assert not out.exists() and not (tmp_path / "out.partial").exists()
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        quantize_checkpoint(bad, out, QuantizeSettings(**FAST), progress=False)
    with pytest.raises(EdgeVLMError, match="not found"):
        quantize_checkpoint(tmp_path / "missing", out, QuantizeSettings(**FAST), progress=False)
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_checkpoint(tiny_pair[1], out, QuantizeSettings(**FAST), progress=False)


def test_cli_quantize_prints_summary_and_one_line_errors(tiny_pair, tmp_path, capsys):
    from edge_vlm.cli import main

    src, _, _ = tiny_pair
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": "The cat sits on a red sofa next to the window. " * 8})
                               for _ in range(20)))
    rc = main(["quantize", str(src), str(tmp_path / "q"), "--calib", str(calib), "--n-samples", "4",
               "--seqlen", "32", "--group-size", "32", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0 and "calibration loss per layer" in text and "smaller" in text
    assert f"calibration: 4 x 32 tokens of {calib}" in text and "weights: model.safetensors" in text
    rc = main(["quantize", str(src), str(tmp_path / "q"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("edge-vlm: error:") and err.count("\n") == 1


def test_vila_keeps_vision_and_projector_and_calibrates_on_images(tiny_vila, tmp_path):
    import skimage.data
    from PIL import Image

    from edge_vlm import load_model

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(skimage.data.chelsea()).save(imgs / "cat.png")
    Image.fromarray(skimage.data.astronaut()).save(imgs / "astronaut.jpg")
    out = tmp_path / "vila-awq"
    quantize_checkpoint(tiny_vila, out, QuantizeSettings(calib_images=str(imgs), **FAST), progress=False)
    for sub in ("vision_tower", "mm_projector"):
        for f in (tiny_vila / sub).iterdir():
            assert (out / sub / f.name).read_bytes() == f.read_bytes()
    assert "quantization_config" in json.loads((out / "llm" / "config.json").read_text())
    model = load_model(out, device="cpu", progress=False)
    assert model.info.quantization.startswith("awq w4") and model.is_multimodal
    from edge_vlm.session import ChatSession
    from edge_vlm.generate import GenerationConfig

    answer = ChatSession(model).answer("What is this?", images=[skimage.data.chelsea()],
                                       gen=GenerationConfig(max_new_tokens=4, temperature=0))
    assert isinstance(answer, str)


@pytest.mark.parametrize("tied", [False, True])
def test_int4_lm_head_option(tmp_path, tied):
    """--quantize-lm-head: lm_head becomes WQLinear (tied embeddings are untied, the embedding stays)."""
    from edge_vlm import load_model
    from edge_vlm.models.quant_linear import WQLinear

    _llm(tmp_path / "src", "llama", seed=6, tie_word_embeddings=tied)
    settings = QuantizeSettings(method="rtn", group_size=32, quantize_lm_head=True)
    quantize_checkpoint(tmp_path / "src", tmp_path / "out", settings, progress=False)
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["quantization_config"]["quantize_lm_head"] is True and conf["tie_word_embeddings"] is False
    model = load_model(tmp_path / "out", device="cpu", progress=False, fast_path=False)
    assert isinstance(model.llm.lm_head, WQLinear) and model.llm.lm_head.out_features == 384
    ids = torch.randint(0, 380, (1, 16), generator=torch.Generator().manual_seed(3))
    ref, got = _logits(tmp_path / "src", ids), _logits(tmp_path / "out", ids)
    assert float((got - ref).norm() / ref.norm()) < 0.4  # 4-bit noise, not a wrong matrix (that gives ~1.4)


def test_out_of_memory_names_the_step_and_suggests_a_fix(tiny_pair, tmp_path, monkeypatch):
    import edge_vlm.quantize.pipeline as pipeline

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipeline, "quantize_layer_awq", oom)
    with pytest.raises(QuantizeError, match="out of memory on cpu while quantizing layer 0; try --device cpu or "
                                            "fewer --n-samples") as e:
        quantize_checkpoint(tiny_pair[0], tmp_path / "out", QuantizeSettings(group_size=32, **FAST), progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_int8_embedding_rounds_each_row_within_half_a_step():
    """Symmetric per-row int8: every entry is within scale/2 = max|row|/254 of the original."""
    from edge_vlm.models.quant_linear import Int8Embedding, quantize_embedding_int8

    w = torch.randn(300, 48, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 300)[:, None]
    q, scales = quantize_embedding_int8(w)
    emb = Int8Embedding(300, 48, dtype=torch.float32)
    emb.qweight.copy_(q)
    emb.scales.copy_(scales.float())
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    got, want = emb(ids), w[ids]
    bound = (w.abs().amax(1) / 254)[ids].unsqueeze(-1) * 1.01 + 1e-6  # fp16 scales: 1% headroom
    assert q.dtype == torch.int8 and bool(((got - want).abs() <= bound).all())


@pytest.mark.parametrize("tied", [False, True])
def test_int8_embedding_option(tmp_path, tied):
    """--quantize-embedding: the table is stored int8 (+ one scale per row) and loads as Int8Embedding;
    with tied embeddings it needs an lm_head of its own (--quantize-lm-head)."""
    from edge_vlm import load_model
    from edge_vlm.models.quant_linear import Int8Embedding

    _llm(tmp_path / "src", "nemotron", seed=7, tie_word_embeddings=tied)
    if tied:
        with pytest.raises(QuantizeError, match="needs --quantize-lm-head"):
            quantize_checkpoint(tmp_path / "src", tmp_path / "bad", QuantizeSettings(
                method="rtn", group_size=32, quantize_embedding=True), progress=False)
        assert not (tmp_path / "bad").exists()
    settings = dict(method="rtn", group_size=32, quantize_lm_head=True)
    quantize_checkpoint(tmp_path / "src", tmp_path / "base", QuantizeSettings(**settings), progress=False)
    quantize_checkpoint(tmp_path / "src", tmp_path / "out", QuantizeSettings(**settings, quantize_embedding=True),
                        progress=False)
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["quantization_config"]["quantize_embedding"] is True
    model = load_model(tmp_path / "out", device="cpu", progress=False)
    assert isinstance(model.llm.embed_tokens, Int8Embedding) and model.llm.embed_tokens.qweight.dtype == torch.int8
    ids = torch.randint(0, 380, (1, 16), generator=torch.Generator().manual_seed(3))
    base, got = _logits(tmp_path / "base", ids), _logits(tmp_path / "out", ids)
    # the two differ only by int8 rounding of the input embeddings (<= 0.4% of each row's max)
    assert 0 < float((got - base).norm() / base.norm()) < 0.05
    from edge_vlm import ChatSession, GenerationConfig

    assert isinstance(ChatSession(model).answer("hi", gen=GenerationConfig(max_new_tokens=3, temperature=0)), str)


def test_older_llava_key_names_quantize_under_their_own_prefixes(tiny_llava, tmp_path):
    """transformers < 4.52 LLaVA folders (language_model.model.*): int4 layers and lm_head keep that naming."""
    import shutil

    from edge_vlm import load_model
    from edge_vlm.formats.checkpoint import TensorStore
    from tests.factories import use_older_llava_key_names

    src = tmp_path / "old"
    shutil.copytree(tiny_llava, src)
    use_older_llava_key_names(src)
    out = tmp_path / "out"
    quantize_checkpoint(src, out, QuantizeSettings(method="rtn", group_size=32, quantize_lm_head=True), progress=False)
    keys = set(TensorStore(out).keys())
    assert "language_model.model.layers.0.mlp.up_proj.qweight" in keys and "language_model.lm_head.qweight" in keys
    assert "vision_tower.embeddings.patch_embedding.weight" in keys and "multi_modal_projector.linear_1.weight" in keys
    assert load_model(out, device="cpu", progress=False).info.quantization.startswith("awq w4")


def test_calibration_images_go_through_the_loaders_checks(tiny_vila, tmp_path):
    """The vision tower is read by load_model's own code: what it refuses, quantizing on images refuses too."""
    import shutil

    from PIL import Image

    src = tmp_path / "s2"
    shutil.copytree(tiny_vila, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "s2": True}))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(imgs / "red.gif")  # every IMAGE_SUFFIXES format counts
    with pytest.raises(UnsupportedModelError, match="s2_scales None") as e:  # S2 without its scales
        quantize_checkpoint(src, tmp_path / "out", QuantizeSettings(calib_images=str(imgs), **FAST), progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out.partial").exists()


# ---------------------------------------------------------------- InternVL / NVLM-D

def _internvl_sources(root: Path) -> dict[str, Path]:
    """One tiny random InternVL in each of its three layouts (same weights; NVLM-D's bias-free mlp1)."""
    from tests.factories import make_internvl_hf, write_internvl_original

    ref = make_internvl_hf(root / "hf", seed=6, projector_bias=False, intermediate_size=64)
    write_internvl_original(root / "orig", ref, root / "hf", style="internvl")
    write_internvl_original(root / "nvlm", ref, root / "hf", style="nvlm", dummy_heads=1)
    return {name: root / name for name in ("hf", "orig", "nvlm")}


@pytest.fixture(scope="module")
def internvl_sources(tmp_path_factory):
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("internvl-awq")
    imgs = root / "imgs"
    imgs.mkdir()
    Image.fromarray(skimage.data.chelsea()).save(imgs / "cat.png")  # 451x300: a 3x2 grid + thumbnail
    Image.fromarray(skimage.data.astronaut()).save(imgs / "astronaut.jpg")
    return _internvl_sources(root), imgs


def _image_prompt_logits(model, image) -> torch.Tensor:
    from edge_vlm import ChatSession

    session = ChatSession(model)
    _, chunks, _ = session._question("What is in the picture?", [image])
    with torch.no_grad():
        embeds = session.engine.embed(session._prompt(chunks, [image]))
        return model.llm(embeds, model.llm.new_cache(embeds.shape[1] + 4), all_logits=True)[0]


@pytest.mark.parametrize("name", ["hf", "orig", "nvlm"])
def test_internvl_layouts_quantize_on_image_tokens_and_load_back(internvl_sources, tmp_path, name):
    """Each layout: AWQ of the Qwen2 LLM calibrated on tiled image tokens, vision tower and projector
    copied bit for bit, the output read back by our loader; image-prompt logits stay within int4 noise.

    Tolerance: asymmetric int4 over groups of 32 rounds each weight to one of 16 levels across its
    group's range (~4 sigma for these Gaussian weights), an rms error of range/15/sqrt(12) ~ 8% of
    each weight's scale, independent per matrix; through 2 decoder layers (7 linears each) and the
    residual stream that gives logits off by ~10-25% of their norm. A misplaced or unscaled matrix
    gives ~1.4 (unrelated logits), so < 0.4 tells the two apart."""
    import skimage.data

    from edge_vlm import ChatSession, GenerationConfig, load_model
    from edge_vlm.formats.checkpoint import TensorStore

    sources, imgs = internvl_sources
    src, out = sources[name], tmp_path / f"{name}-awq"
    summary = quantize_checkpoint(src, out, QuantizeSettings(calib_images=str(imgs), group_size=32, **FAST),
                                  progress=False)
    image_line = summary.calibration[-1]
    fmt = "nvlm" if name == "nvlm" else "internvl"
    assert image_line.startswith("image tokens of 2 images") and f"tiles of 4 tokens in the {fmt} format" in image_line
    tiles = [int(n) for n in image_line.split("(")[1].split(" ")[0].split("+")]
    # (sorted by name) the 512 px astronaut's 2x2 grid of 56 px tiles, the cat's 3x2, each + the thumbnail;
    # NVLM-D's tile tags are plain text in this tokenizer (many tokens each): at --seqlen 64, smaller grids
    assert tiles == [5, 7] if fmt == "internvl" else (max(tiles) > 1 and sum(tiles) < 12)
    conf = json.loads((out / "config.json").read_text())["quantization_config"]
    kept = ["vision_tower", "multi_modal_projector"] if name == "hf" else ["vision_model", "mlp1"]
    assert conf["modules_to_not_convert"] == ["lm_head"] + kept
    before, after = TensorStore(src), TensorStore(out)
    vision_keys = [k for k in before.keys() if set(k.split(".")[:2]) & set(kept)]
    assert vision_keys and all(torch.equal(before.get(k), after.get(k)) for k in vision_keys)
    assert any(k.endswith("layers.1.mlp.down_proj.qweight") for k in after.keys())

    ref = load_model(src, device="cpu", progress=False, fast_path=False)
    model = load_model(out, device="cpu", progress=False, fast_path=False)
    assert model.info.quantization == "awq w4 g32" and model.image_format == ref.image_format == fmt
    image = skimage.data.coffee()
    from PIL import Image

    image = Image.fromarray(image)
    got, expected = _image_prompt_logits(model, image), _image_prompt_logits(ref, image)
    assert got.shape == expected.shape and got.shape[0] > 3 * model.tokens_per_image  # several tiles
    err = float((got - expected).norm() / expected.norm())
    assert 0 < err < 0.4, err
    session = ChatSession(model)
    answer = session.answer("What is this?", images=[image], gen=GenerationConfig(max_new_tokens=4, temperature=0))
    assert session.stats.new_tokens >= 1 and isinstance(answer, str)


def test_internvl_calibration_sample_starts_with_the_image_as_the_runtime_feeds_it(internvl_sources):
    """The calibration rows of an image equal the runtime's embedded prompt text for that image: NVLM-D's
    tile tags around each tile's projected embeddings (tiles and projector as `load_model` runs them)."""
    from edge_vlm import ChatSession, load_model
    from edge_vlm.text.templates import IMAGE_MARK
    from edge_vlm.formats.checkpoint import TensorStore
    from edge_vlm.imaging.preprocess import load_image
    from edge_vlm.quantize.pipeline import calibration_inputs, inspect_source

    sources, imgs = internvl_sources
    layout = inspect_source(sources["nvlm"])
    settings = QuantizeSettings(calib_images=str(imgs), n_samples=3, seqlen=512)
    x = calibration_inputs(layout, TensorStore(layout.llm_dir), settings, "cpu", torch.float32)
    assert x.shape == (3, 512, layout.llm.hidden_size)
    model = load_model(sources["nvlm"], device="cpu", progress=False, fast_path=False)
    session = ChatSession(model)
    for i, name in enumerate(["astronaut.jpg", "cat.png", "astronaut.jpg"]):  # round robin over the images
        img = load_image(imgs / name)
        text = model.image_text(model.tile_count(img)) + "\n"  # 512 tokens: every tile fits
        chunks = [model.tokenizer.encode(p) for p in text.split(IMAGE_MARK)]
        with torch.no_grad():
            expected = session.engine.embed(session._prompt(chunks, [img]))[0]
        assert model.tile_count(img) > 1 and torch.allclose(x[i, :len(expected)], expected, atol=1e-6)
        assert not torch.allclose(x[i, len(expected):len(expected) + 4], expected[:4])  # then text
