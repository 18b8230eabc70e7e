"""The product's models at their real size, with random weights, and `edge-vlm quantize` timed on them.

Everything measured on SmolLM2-135M or on 2-layer stand-ins hides what a user of VILA1.5-3B
waits for. This builds, from the published shapes of benchmarks/shapes.py alone (config only,
nothing downloaded), checkpoint folders a user would have: VILA1.5-3B (Sheared-LLaMA-2.7B + the
SigLIP-so400m tower + the mlp_downsample projector, in VILA's llm/ vision_tower/ mm_projector/
layout) and Nemovision-4B (Nemotron-Mini-4B + CLIP-L/14-336 in one LLaVA folder). Speed depends on
shapes, not values, so the weights are random (fp16, written tensor by tensor: the peak stays near
one shard). Folders are cached on disk (`--cache`, default ~/.cache/edge-vlm/real-size) and
reused while their shapes are unchanged; nothing here runs in the test suite's fast tier.

    python -m edge_vlm.benchmarks.real_size build VILA1.5-3B                 # 6.3 GB folder, once
    python -m edge_vlm.benchmarks.real_size layer --shape vila1.5-3b         # one layer, default 128 x 512
    python -m edge_vlm.benchmarks.real_size layer --shape llama-3-8b --n-samples 16
    python -m edge_vlm.benchmarks.real_size quantize VILA1.5-3B              # the whole default run, timed
    python -m edge_vlm.benchmarks.real_size gpu-estimate                     # from the operation counts
    python -m edge_vlm.benchmarks.real_size nvila-ttft NVILA-Lite-2B         # 1-image TTFT: tower + prefill

`layer` times one decoder layer of the shape (random weights, random hidden states with a few
outlier channels) through `quantize_layer_awq` with the settings `edge-vlm quantize` would use, per
step, beside the step's operation count and the rate it reached: where the time goes, at any width.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from edge_vlm.formats.configs import LLMConfig
from edge_vlm.quantize.awq import LayerRunner, quantize_layer_awq
from edge_vlm.quantize.cost import Step, layer_seconds, layer_steps, step_seconds
from edge_vlm.quantize.matmul_choice import choose_matmul
from edge_vlm.quantize.pipeline import FAST, QuantizeSettings, awq_options, pick_group_size, quantize_checkpoint

from .shapes import LLM_SHAPES, NVILA_VLMS, TINY_NVILA_LLM, TINY_NVILA_TOWER, VLMS, llm_config

MARKER = "real_size.json"
SHARD_BYTES = 2 * 10**9
DEFAULT_CACHE = Path("~/.cache/edge-vlm/real-size")
# the timed steps of quantize_layer_awq (LayerResult.seconds) and the counted steps (cost.py) in each
TIMED = {"forward 16-bit + H": ("forward 16-bit", "H = X^T X"),
         "scale search": ("scale search: linear blocks (H)", "scale search: MLP block (tokens)",
                          "scale search: fake quantization"),
         "clipping + rounding": ("GPTQ: factor of H^-1", "GPTQ: column sweep", "GPTQ: per-column ops",
                                 "clipping search", "clipping search: fake quantization"),
         "forward quantized": ("forward quantized",)}


# ------------------------------------------------------------------ building the folders

def _hf_text_config(shape: str):
    """The transformers config of an LLM shape of shapes.LLM_SHAPES (as its checkpoint's config.json says)."""
    from transformers import LlamaConfig, NemotronConfig, Qwen2Config

    s = LLM_SHAPES[shape]
    common = dict(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                  num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
                  num_key_value_heads=s["num_kv_heads"], head_dim=s["head_dim"], max_position_embeddings=4096,
                  rope_theta=s.get("rope_theta", 10000.0), tie_word_embeddings=s.get("tie_word_embeddings", False),
                  bos_token_id=1, eos_token_id=2)
    if s["arch"] == "qwen2":  # q/k/v biases are Qwen2's own (no switch in its config)
        return Qwen2Config(rms_norm_eps=s["norm_eps"], architectures=["Qwen2ForCausalLM"], **common)
    if s["arch"] == "nemotron":
        return NemotronConfig(norm_eps=s["norm_eps"], partial_rotary_factor=s["partial_rotary_factor"],
                              architectures=["NemotronForCausalLM"], **common)
    return LlamaConfig(rms_norm_eps=s["norm_eps"], architectures=["LlamaForCausalLM"], **common)


def _hf_vision_config(tower: dict):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = SiglipVisionConfig if tower["arch"] == "siglip" else CLIPVisionConfig
    return cls(hidden_size=tower["hidden_size"], intermediate_size=tower["intermediate_size"],
               num_hidden_layers=tower["num_layers"], num_attention_heads=tower["num_heads"],
               image_size=tower["image_size"], patch_size=tower["patch_size"],
               layer_norm_eps=tower["layer_norm_eps"], hidden_act=tower["hidden_act"])


def _meta_shapes(model_cls, config) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor the transformers class saves, from a meta-device instance (no memory)."""
    with torch.device("meta"):
        model = model_cls(config)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator, norm_fill: float) -> torch.Tensor:
    """fp16 values of the usual initialisation: N(0, 0.02) matrices, norms `norm_fill` (0 for Nemotron's
    zero-centred LayerNorm1P), zero biases; written row block by row block (the 256k-row embeddings)."""
    if len(shape) == 1:
        if key.endswith("bias"):
            return torch.zeros(shape, dtype=torch.float16)
        if "norm" in key:
            return torch.full(shape, norm_fill, dtype=torch.float16)
        return (0.02 * torch.randn(shape, generator=gen)).half()
    out = torch.empty(shape, dtype=torch.float16)
    rows = max(1, (1 << 24) // max(1, out[0].numel()))
    for r in range(0, shape[0], rows):
        out[r:r + rows] = 0.02 * torch.randn((min(rows, shape[0] - r), *shape[1:]), generator=gen)
    return out


def _write_weights(folder: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int,
                   norm_fill=lambda key: 1.0) -> None:
    """Random tensors as Hugging Face shards (+ index), one shard in memory at a time."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    shards, current, size = [], {}, 0
    total = sum(2 * _numel(s) for _, s in tensors)
    many = total > SHARD_BYTES
    weight_map = {}

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors" if many else "model.safetensors"
            save_file(current, str(folder / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update(dict.fromkeys(current, name))
        current, size = {}, 0

    for key, shape in tensors:
        n = 2 * _numel(shape)
        if current and size + n > SHARD_BYTES:
            flush()
        current[key] = _random_tensor(key, shape, gen, norm_fill(key))
        size += n
    flush()
    if many:  # Hugging Face names the shards -0000i-of-0000N
        final = {name: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, name in enumerate(shards)}
        for old, new in final.items():
            os.replace(folder / old, folder / new)
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}, indent=1))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _tokenizer(folder: Path, vocab: int) -> None:
    """A byte-level BPE trained on the standard library's prose (at most the model's vocabulary: the
    model's own is not downloadable here; prompts just become real token sequences)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab, 32000), special_tokens=["<unk>", "<s>", "</s>", "<image>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(topics.values()), trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 4096,
         "tokenizer_class": "PreTrainedTokenizerFast"}))


def _preprocessor(tower: dict) -> dict:
    size = tower["image_size"]
    if tower["arch"] == "siglip":
        return {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
                "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "do_center_crop": True, "crop_size": {"height": size, "width": size}, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711]}


def _build_vila(folder: Path, llm_shape: str, tower: dict, seed: int) -> None:
    """VILA's layout: config.json (llava_llama) + llm/ + vision_tower/ + mm_projector/ (mlp_downsample)."""
    from transformers import LlamaForCausalLM, SiglipVisionModel

    text, vision = _hf_text_config(llm_shape), _hf_vision_config(tower)
    for sub in ("llm", "vision_tower", "mm_projector"):
        (folder / sub).mkdir(parents=True)
    text.save_pretrained(folder / "llm")
    _write_weights(folder / "llm", _meta_shapes(LlamaForCausalLM, text), seed)
    _tokenizer(folder / "llm", text.vocab_size)
    vision.save_pretrained(folder / "vision_tower")
    _write_weights(folder / "vision_tower", _meta_shapes(SiglipVisionModel, vision), seed + 1)
    (folder / "vision_tower" / "preprocessor_config.json").write_text(json.dumps(_preprocessor(tower)))
    mm, hidden = vision.hidden_size, text.hidden_size  # 2x2 patches merged, LayerNorm, Linear, GELU, Linear
    _write_weights(folder / "mm_projector", [("layers.1.weight", (4 * mm,)), ("layers.1.bias", (4 * mm,)),
                                             ("layers.2.weight", (hidden, 4 * mm)), ("layers.2.bias", (hidden,)),
                                             ("layers.4.weight", (hidden, hidden)), ("layers.4.bias", (hidden,))],
                   seed + 2)
    projector = {"mm_projector_type": "mlp_downsample", "model_type": "v2l_projector"}
    (folder / "mm_projector" / "config.json").write_text(json.dumps({"architectures": ["MultimodalProjector"],
                                                                      **projector}))
    top = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "hidden_size": hidden,
           "mm_hidden_size": mm, "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch",
           "image_aspect_ratio": "resize", "llm_cfg": text.to_dict(), "vision_tower_cfg": vision.to_dict(),
           "mm_projector_cfg": projector, "num_video_frames": 8}
    (folder / "config.json").write_text(json.dumps(top, indent=1))


def _projector_tensors(kind: str, mm: int, hidden: int) -> list[tuple[str, tuple[int, ...]]]:
    """VILA's mm_projector Sequential keys: merge (no weights), LayerNorm, Linear, GELU, ...; the 3x3 kinds put
    a LayerNorm before the middle Linear (indices as in VILA's base_projector)."""
    if kind == "mlp_downsample_3x3_fix":  # 0 merge, 1 LN(9m), 2 Lin(9m, 3m), 3 GELU, 4 LN(3m), 5 Lin(3m, h), 6 GELU, 7 Lin
        dims = {1: (9 * mm,), 2: (3 * mm, 9 * mm), 4: (3 * mm,), 5: (hidden, 3 * mm), 7: (hidden, hidden)}
    else:  # mlp_downsample (_2x2_fix): 0 merge, 1 LN(4m), 2 Lin(4m, h), 3 GELU, 4 Lin(h, h)
        dims = {1: (4 * mm,), 2: (hidden, 4 * mm), 4: (hidden, hidden)}
    return [(f"layers.{i}.{p}", shape if p == "weight" else shape[:1]) for i, shape in dims.items()
            for p in ("weight", "bias")]


def _build_nvila(folder: Path, llm_shape: str, tower: dict, projector: str, scales: tuple[int, ...] | None,
                 seed: int) -> None:
    """NVILA's layout (VILA's llm/ vision_tower/ mm_projector/ with a Qwen2 LLM) and its top config keys:
    dynamic S2 over `scales`, or (None) NVILA-Lite's image_aspect_ratio "dynamic" tiles; max_tiles 12."""
    import transformers

    from .shapes import NVILA_MAX_TILES

    text, vision = _hf_text_config(llm_shape), _hf_vision_config(tower)
    for sub in ("llm", "vision_tower", "mm_projector"):
        (folder / sub).mkdir(parents=True)
    text.save_pretrained(folder / "llm")
    _write_weights(folder / "llm", [(k, s) for k, s in _meta_shapes(transformers.Qwen2ForCausalLM, text)
                                    if not (text.tie_word_embeddings and k == "lm_head.weight")], seed)
    _tokenizer(folder / "llm", text.vocab_size)
    vision.save_pretrained(folder / "vision_tower")
    _write_weights(folder / "vision_tower", _meta_shapes(transformers.SiglipVisionModel, vision), seed + 1)
    (folder / "vision_tower" / "preprocessor_config.json").write_text(json.dumps(_preprocessor(tower)))
    mm, hidden = vision.hidden_size * (len(scales) if scales else 1), text.hidden_size
    _write_weights(folder / "mm_projector", _projector_tensors(projector, mm, hidden), seed + 2)
    (folder / "mm_projector" / "config.json").write_text(json.dumps(
        {"architectures": ["MultimodalProjector"], "mm_projector_type": projector, "model_type": "v2l_projector"}))
    encoders = {"image_encoder": json.dumps({"_target_": "llava.model.encoders.BasicImageEncoder"}),
                "video_encoder": json.dumps({"_target_": "llava.model.encoders.BasicVideoEncoder"})}
    if scales:
        tiling = {"dynamic_s2": True, "s2": False, "image_aspect_ratio": "dynamic_s2", "s2_scales":
                  ",".join(map(str, scales)), "s2_max_split_size": scales[0], "s2_resize_output_to_scale_idx": -1}
    else:
        tiling = {"dynamic_s2": False, "s2": False, "image_aspect_ratio": "dynamic"}
    top = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "hidden_size": hidden,
           "mm_hidden_size": mm, "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch",
           "mm_projector_type": projector, "min_tiles": 1, "max_tiles": NVILA_MAX_TILES, "num_video_frames": 8,
           **tiling, **encoders}
    (folder / "config.json").write_text(json.dumps(top, indent=1))


def _build_llava(folder: Path, llm_shape: str, tower: dict, seed: int) -> None:
    """One transformers LlavaForConditionalGeneration folder (Nemovision / NeVA style, CLS dropped)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text, vision = _hf_text_config(llm_shape), _hf_vision_config(tower)
    cfg = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=text.vocab_size - 1,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      architectures=["LlavaForConditionalGeneration"])
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    nemotron = LLM_SHAPES[llm_shape]["arch"] == "nemotron"
    zero_centred = lambda key: 0.0 if nemotron and "language_model" in key else 1.0  # noqa: E731
    _write_weights(folder, _meta_shapes(LlavaForConditionalGeneration, cfg), seed, zero_centred)
    _tokenizer(folder, text.vocab_size)
    (folder / "preprocessor_config.json").write_text(json.dumps(_preprocessor(tower)))


def build(name: str, cache: Path = DEFAULT_CACHE, seed: int = 0, log=print) -> Path:
    """The random-weight folder of VLMS[name] under `cache`: built once, reused while its shapes are the same."""
    llm_shape, tower, projector = VLMS[name]
    return build_folder(Path(cache).expanduser() / name, llm_shape, tower, projector, seed, log)


def build_nvila(name: str, cache: Path = DEFAULT_CACHE, seed: int = 0, log=print, tiny: bool = False) -> Path:
    """The random-weight folder of NVILA_VLMS[name] (NVILA's layout, see `_build_nvila`); `tiny`: the same
    layout and config keys at a few-kB size (shapes.TINY_NVILA), for checking the benchmark runs."""
    llm_shape, tower, projector, scales = NVILA_VLMS[name]
    if tiny:
        llm_shape, tower, scales = TINY_NVILA_LLM, TINY_NVILA_TOWER, scales and tuple(
            s * TINY_NVILA_TOWER["image_size"] // tower["image_size"] for s in scales)
    folder = Path(cache).expanduser() / (name + ("-tiny" if tiny else ""))
    return build_folder(folder, llm_shape, tower, projector, seed, log, nvila_scales=scales, nvila=True)


def build_folder(folder: Path, llm_shape: str, tower: dict, projector: str, seed: int = 0, log=print,
                 nvila_scales: tuple[int, ...] | None = None, nvila: bool = False) -> Path:
    """`folder` holding a random VLM of an LLM shape, a tower (shapes.py dicts) and a projector kind
    (`nvila`: in NVILA's layout, dynamic S2 over `nvila_scales` or, None, NVILA-Lite's tiles)."""
    import transformers

    name = folder.name
    spec = {"llm": LLM_SHAPES[llm_shape], "tower": tower, "projector": projector, "seed": seed,
            "transformers": transformers.__version__}
    if nvila:
        spec["nvila_scales"] = list(nvila_scales) if nvila_scales else None
    if (folder / MARKER).is_file() and json.loads((folder / MARKER).read_text()) == spec:
        return folder
    partial = folder.with_name(name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    t = time.perf_counter()
    log(f"building {folder} (random weights of the published shapes)...")
    if nvila:
        _build_nvila(partial, llm_shape, tower, projector, nvila_scales, seed)
    else:
        (_build_vila if projector == "mlp_downsample" else _build_llava)(partial, llm_shape, tower, seed)
    (partial / MARKER).write_text(json.dumps(spec, indent=1))
    os.replace(partial, folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    log(f"built {folder}: {size / 2**30:.2f} GiB in {time.perf_counter() - t:.0f} s")
    return folder


# ------------------------------------------------------------------ timing quantize

def _random_layer(cfg: LLMConfig, seed: int):
    from edge_vlm.models.llm import DecoderLayer, LayerNorm1P

    torch.manual_seed(seed)
    with torch.device("meta"):
        layer = DecoderLayer(cfg)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        for mod in layer.modules():
            for name, p in mod.named_parameters(recurse=False):
                if p.dim() == 2:
                    p.normal_(0, 0.02)
                elif name == "bias" or isinstance(mod, LayerNorm1P):
                    p.zero_()
                else:
                    p.fill_(1.0)
    return layer.float()


def _hidden_states(cfg: LLMConfig, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """Unit-variance hidden states with 8 outlier channels 20x larger: what AWQ's scales are for."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, seqlen, cfg.hidden_size, generator=gen)
    x[..., :8] *= 20
    return x


def time_layer(shape: str, settings: QuantizeSettings, matmul: str = "auto", seed: int = 0) -> dict:
    """One decoder layer of `shape` quantized as `edge-vlm quantize` with `settings` would: seconds per timed
    step, the counted operations of each, and the estimate those counts make at the measured rates."""
    cfg = llm_config(shape, layers=1)
    group = pick_group_size(cfg, settings.group_size)
    chosen, rates = choose_matmul(matmul, "cpu", cfg.hidden_size)
    opts = awq_options(settings, group, chosen)
    layer = _random_layer(cfg, seed)
    x = _hidden_states(cfg, settings.n_samples, settings.seqlen, seed)
    runner = LayerRunner(cfg, settings.seqlen, "cpu")
    t = time.perf_counter()
    result, _ = quantize_layer_awq(layer, cfg, x, runner, opts)
    total = time.perf_counter() - t
    steps = {s.name: s for s in layer_steps(cfg, settings.n_samples, settings.seqlen, opts)}
    return {"shape": shape, "tokens": settings.n_samples * settings.seqlen, "matmul": chosen, "rates": rates,
            "seconds": total, "steps": result.seconds, "counted": steps, "loss": result.loss,
            "estimate": layer_seconds(list(steps.values()), rates.per_second(chosen)),
            "layers": LLM_SHAPES[shape]["num_layers"]}


def layer_table(r: dict) -> str:
    per = r["rates"].per_second(r["matmul"])
    lines = [f"one {r['shape']} decoder layer, {r['tokens']} calibration tokens, {r['matmul']} products: "
             f"{r['seconds']:.1f} s (x {r['layers']} layers = {r['seconds'] * r['layers'] / 60:.1f} min); "
             f"estimate from the counts {r['estimate']:.1f} s; calibration loss {r['loss']:.2e}",
             f"measured rates: {r['rates'].fp32:.0f} GFLOP/s float32, {r['rates'].bf16:.0f} bf16, "
             f"{r['rates'].fp64:.0f} float64, {r['rates'].elementwise:.1f} G element-passes/s",
             "| step | seconds | share | counted TFLOP (matmul kinds) | estimate s | reached of the measured rate |",
             "|---|---|---|---|---|---|"]
    for timed, names in TIMED.items():
        sec = r["steps"].get(timed, 0.0)
        counted = [r["counted"][n] for n in names if n in r["counted"]]
        flops = sum(s.amount for s in counted if s.kind in ("forward", "search", "fp32", "fp64"))
        est = sum(step_seconds(s, per) for s in counted)
        lines.append(f"| {timed} | {sec:.1f} | {100 * sec / r['seconds']:.0f}% | {flops / 1e12:.2f} | {est:.1f} | "
                     f"{100 * est / max(sec, 1e-9):.0f}% |")
    return "\n".join(lines)


def quantize_full(name: str, cache: Path, out: Path | None, fast: bool, matmul: str) -> str:
    """`edge-vlm quantize` of the whole real-size folder with the default settings (or --fast), timed."""
    src = build(name, cache)
    out = out or src.with_name(src.name + ("-awq-fast" if fast else "-awq"))
    settings = QuantizeSettings(matmul=matmul, **(FAST if fast else {}))
    t = time.perf_counter()
    summary = quantize_checkpoint(src, out, settings, force=True)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return f"{summary.text()}\nwall {wall / 60:.1f} min, peak RSS {peak:.2f} GiB"


# ------------------------------------------------------------------ NVILA: time to first token of a picture

QUESTION = "What is in this picture? Describe it in one sentence."


def nvila_ttft(folder: Path, max_tiles: int | None, repeats: int = 2, llm_backend: str = "torch") -> dict:
    """A 1-image question (a 640x480 picture) to the NVILA folder on the CPU (torch LLM), `max_tiles`
    None: the checkpoint's own; `llm_backend`: "torch" or "llama.cpp" (the CPU default). Medians over `repeats` after a warm-up of: the tower (preprocessing, SigLIP
    over every tile, the projector: `encode_images`) and the session's time to first token, which runs
    the tower again; "prefill" is their difference (prompt prefill and the first token)."""
    from edge_vlm import ChatSession, GenerationConfig, load_model
    from edge_vlm.backends.onnx.int8 import synthetic_images
    from edge_vlm.imaging.s2_tiling import plan_dynamic_s2

    from .shapes import CAMERA_FRAME

    model = load_model(folder, device="cpu", progress=False, max_tiles=max_tiles, llm_backend=llm_backend)
    image = synthetic_images(1, seed=3)[0].resize(CAMERA_FRAME)
    tiles = model.message_tiles([image])
    gen = GenerationConfig(max_new_tokens=1, temperature=0)
    tower, ttft, session = [], [], None
    for i in range(repeats + 1):  # the first run warms up (weight packing, allocator)
        t = time.perf_counter()
        with torch.inference_mode():
            model.encode_images(tiles)
        dt = time.perf_counter() - t
        session = ChatSession(model)
        session.answer(QUESTION, images=[image], gen=gen)
        if i:
            tower.append(dt)
            ttft.append(session.stats.ttft_s)
    t_tower, t_first = statistics.median(tower), statistics.median(ttft)
    s2 = model.s2
    return {"max_tiles": model.info.max_tiles, "tower_tiles": plan_dynamic_s2(*image.size, s2).num_tiles if s2
            else len(tiles), "image_tokens": model.image_tokens([image]), "prompt_tokens": session.stats.prompt_tokens,
            "tower_s": t_tower, "prefill_s": t_first - t_tower, "ttft_s": t_first}


def nvila_ttft_table(name: str, folder: Path, repeats: int, llm_backend: str = "torch") -> str:
    from .vision_backends import cpu_facts

    facts = cpu_facts()
    rows = [nvila_ttft(folder, None, repeats, llm_backend), nvila_ttft(folder, 1, repeats, llm_backend)]
    lines = [f"{name}-shaped (random weights) 1-image question, 640x480 picture, tower in torch, LLM on {llm_backend}, "
             f"CPU: {facts['name']}, "
             f"{facts['cores']} threads; median of {repeats} after a warm-up; load average {os.getloadavg()[0]:.1f}",
             "| --max-tiles | tower tiles | image tokens | prompt tokens | tower s | prefill s | "
             "time to first token s |",
             "|---|---|---|---|---|---|---|"]
    for label, r in zip((f"{rows[0]['max_tiles']} (default)", "1"), rows):
        lines.append(f"| {label} | {r['tower_tiles']} | {r['image_tokens']} | {r['prompt_tokens']} | "
                     f"{r['tower_s']:.2f} | {r['prefill_s']:.2f} | {r['ttft_s']:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ GPU estimate

# Published peak rates (dense, TFLOP/s; memory TB/s) and the share of them assumed reached. On CUDA the
# layer runs in fp16 (tensor cores) and the searches, H and GPTQ in float32 (TF32 off, torch's default).
GPUS = {
    "H100 SXM": dict(fp16=989, fp32=67, fp64=67, bandwidth=3.35),
    "RTX 4090": dict(fp16=165, fp32=82.6, fp64=1.3, bandwidth=1.01),
}
GPU_EFFICIENCY = 0.5       # of the peak matmul rates
GPU_SECONDS_PER_OP = 10e-6  # one small kernel launched from Python (GPTQ's column sweep runs them in sequence)


def gpu_rates(gpu: dict) -> dict[str, float]:
    bytes_per_pass = 8  # a float32 read and write per element pass
    return {"forward": GPU_EFFICIENCY * gpu["fp16"] * 1e12, "search": GPU_EFFICIENCY * gpu["fp32"] * 1e12,
            "fp32": GPU_EFFICIENCY * gpu["fp32"] * 1e12, "fp64": GPU_EFFICIENCY * gpu["fp64"] * 1e12,
            "elements": gpu["bandwidth"] * 1e12 / bytes_per_pass, "ops": 1 / GPU_SECONDS_PER_OP}


def gpu_estimate(shapes=("vila1.5-3b", "nemotron-mini-4b", "llama-3-8b"), settings: QuantizeSettings | None = None
                 ) -> str:
    settings = settings or QuantizeSettings()
    lines = [f"GPU estimate from the operation counts ({settings.n_samples} x {settings.seqlen} calibration tokens), "
             f"at {100 * GPU_EFFICIENCY:.0f}% of the published peak rates, {GPU_SECONDS_PER_OP * 1e6:.0f} us a "
             f"sequential kernel:", "| model | GPU | per layer s | whole model min | largest step |", "|---|---|---|---|---|"]
    for shape in shapes:
        cfg = llm_config(shape)
        steps = layer_steps(cfg, settings.n_samples, settings.seqlen,
                            awq_options(settings, pick_group_size(cfg, settings.group_size), "fp32"))
        for gname, gpu in GPUS.items():
            rates = gpu_rates(gpu)
            per = layer_seconds(steps, rates)
            top: Step = max(steps, key=lambda s: step_seconds(s, rates))
            lines.append(f"| {shape} | {gname} | {per:.1f} | {per * cfg.num_layers / 60:.1f} | {top.name} "
                         f"({step_seconds(top, rates):.1f} s) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find cached) the random real-size folder of a VLM")
    b.add_argument("name", choices=[n for n in VLMS if n in ("VILA1.5-3B", "Nemovision-4B")])
    q = sub.add_parser("quantize", help="the whole default `edge-vlm quantize` of a real-size folder, timed")
    q.add_argument("name", choices=["VILA1.5-3B", "Nemovision-4B"])
    q.add_argument("--out", type=Path, help="output folder (default: beside the source, -awq)")
    q.add_argument("--fast", action="store_true", help="the --fast preset")
    layer = sub.add_parser("layer", help="one decoder layer of a shape, timed per step against its counts")
    layer.add_argument("--shape", default="vila1.5-3b", choices=[s for s in LLM_SHAPES if s != "tiny"] + ["tiny"])
    layer.add_argument("--n-samples", type=int, help="calibration samples (default 128, or --fast's)")
    layer.add_argument("--seqlen", type=int, default=512)
    layer.add_argument("--fast", action="store_true", help="the --fast preset")
    sub.add_parser("gpu-estimate", help="quantize time on GPUs, from the operation counts")
    nv = sub.add_parser("nvila-ttft", help="time to first token of a 1-image question to a real-size NVILA, split "
                                           "into tower and prefill, at the default --max-tiles and at 1")
    nv.add_argument("name", nargs="?", default="NVILA-Lite-2B", choices=list(NVILA_VLMS),
                    help="the shape (default NVILA-Lite-2B: a ~4 GB folder, built once)")
    nv.add_argument("--tiny", action="store_true", help="a few-kB model of the same layout (checks the run only)")
    nv.add_argument("--repeats", type=int, default=2, help="timed runs per setting after a warm-up (default 2)")
    nv.add_argument("--backend", choices=["torch", "llama.cpp"], default="torch",
                    help="what runs the LLM (llama.cpp: the CPU default of edge-vlm chat; its GGUF exported once)")
    for s in (b, q, nv):
        s.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"where folders are kept (default {DEFAULT_CACHE})")
    for s in (q, layer):
        s.add_argument("--matmul", choices=["auto", "fp32", "bf16"], default="auto")
    a = p.parse_args(argv)
    if a.cmd == "build":
        print(build(a.name, a.cache))
    elif a.cmd == "quantize":
        print(quantize_full(a.name, a.cache, a.out, a.fast, a.matmul))
    elif a.cmd == "layer":
        over = dict(FAST) if a.fast else {}
        if a.n_samples:
            over["n_samples"] = a.n_samples
        print(layer_table(time_layer(a.shape, QuantizeSettings(seqlen=a.seqlen, **over), a.matmul)))
    elif a.cmd == "nvila-ttft":
        if a.repeats < 1:
            p.error("--repeats must be at least 1")
        print(nvila_ttft_table(a.name, build_nvila(a.name, a.cache, tiny=a.tiny), a.repeats, a.backend))
    else:
        print(gpu_estimate())
    return 0


if __name__ == "__main__":
    sys.exit(main())
