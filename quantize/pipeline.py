"""`quantize_checkpoint`: a 16-bit checkpoint folder -> an AWQ (or RTN) 4-bit folder.

Streams the LLM one decoder layer at a time: only that layer's weights and the calibration
hidden states are in memory. Every finished layer is written as its own safetensors shard
in `OUT.partial/` together with the hidden states after it, so an interrupted run resumes
from the last finished layer (`resume=True`). The folder is renamed to OUT only when complete.

Output = the AutoAWQ GEMM layout (loadable by our runtime, transformers and vLLM):
`<prefix>.layers.N.<linear>.{qweight,qzeros,scales[,bias]}`, the config with a
`quantization_config` block, everything else (embeddings, norms, lm_head, tokenizer, and for
VLMs the vision tower and projector) copied unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from edge_vlm.awq_format import pack_gemm
from edge_vlm.checkpoint import TensorStore, load_into, read_json, resolve_model_path
from edge_vlm.config import SUPPORTED_LLMS, LLMConfig
from edge_vlm.errors import EdgeVLMError, UnsupportedModelError
from edge_vlm.llm import DecoderLayer

from .awq import AWQOptions, LayerRunner, LayerResult, quantize_layer_awq, quantize_layer_rtn
from .calibration import calibration_blocks, default_calibration_text, list_images, read_calibration_file
from .groupwise import QuantizedWeight, quantize_weight

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class QuantizeError(EdgeVLMError):
    """A quantization run cannot proceed (bad input, out of memory): one line for the user."""


@dataclass
class QuantizeSettings:
    method: str = "awq"              # "awq" or "rtn"
    w_bit: int = 4
    group_size: int | None = None    # None: 128, or the largest of 64/32 that divides every layer
    n_samples: int = 128
    seqlen: int = 512
    calib: str | None = None         # .txt / .jsonl; None: the built-in pydoc prose
    calib_images: str | None = None  # folder of images (VLM sources)
    device: str | None = None
    clip: bool = True
    duo_scaling: bool = True
    search_tokens: int = 4096        # calibration tokens scoring each scale candidate (cost ~ linear)
    quantize_lm_head: bool = False   # int4 lm_head (RTN): big vocabularies, e.g. Nemotron's 256k
    quantize_embedding: bool = False  # int8 token embeddings (per-row scale)


@dataclass
class Summary:
    src: str
    out: str
    method: str
    group_size: int
    bytes_before: int
    bytes_after: int
    seconds: float
    layer_losses: list[float] = field(default_factory=list)

    def text(self) -> str:
        mb = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
        lines = [f"quantized {self.src} -> {self.out}",
                 f"method {self.method.upper()} w4 g{self.group_size}; size {mb(self.bytes_before)} -> "
                 f"{mb(self.bytes_after)} ({self.bytes_before / max(self.bytes_after, 1):.2f}x smaller); "
                 f"time {self.seconds:.1f} s"]
        if self.method == "awq" and self.layer_losses:
            lines.append("calibration loss per layer (|out_q - out_16bit|^2 / |layer update|^2):")
            for i in range(0, len(self.layer_losses), 6):
                lines.append("  " + "  ".join(f"{i + j:>3}: {v:.2e}" for j, v in enumerate(self.layer_losses[i:i + 6])))
        return "\n".join(lines)


# ------------------------------------------------------------------ source layouts

@dataclass
class Source:
    folder: Path      # what the user gave
    layout: str       # "llm", "vila", "llava"
    llm_dir: Path     # the folder holding the LLM weights and its config
    llm_config: dict  # the LLM's config dict
    config_path: Path  # the config.json that receives quantization_config


def inspect_source(src) -> Source:
    folder = resolve_model_path(src)
    top = read_json(folder / "config.json")
    if (folder / "llm" / "config.json").is_file():
        for sub in ("vision_tower", "mm_projector"):
            if not (folder / sub).is_dir():
                raise QuantizeError(f"VILA checkpoint {folder} lacks the {sub}/ folder")
        src_ = Source(folder, "vila", folder / "llm", read_json(folder / "llm" / "config.json"),
                      folder / "llm" / "config.json")
    elif top.get("model_type") == "llava" and "text_config" in top:
        src_ = Source(folder, "llava", folder, top["text_config"], folder / "config.json")
    elif top.get("model_type") in SUPPORTED_LLMS:
        src_ = Source(folder, "llm", folder, top, folder / "config.json")
    else:
        raise UnsupportedModelError(
            f"cannot quantize model type {top.get('model_type')!r} in {folder}; supported: a Llama / Qwen2 / "
            f"Nemotron LLM folder, a VILA folder or a LLaVA folder")
    if read_json(src_.config_path).get("quantization_config") or src_.llm_config.get("quantization_config"):
        raise QuantizeError(f"{folder} is already quantized (its config has a quantization_config)")
    return src_


def _layer_prefix(store: TensorStore) -> str:
    for key in store.keys():
        if key.endswith("layers.0.input_layernorm.weight"):
            return key[: -len("0.input_layernorm.weight")]
    raise QuantizeError(f"no decoder layers found in {store.folder} (no '*layers.0.input_layernorm.weight')")


def _pick_group_size(cfg: LLMConfig, requested: int | None) -> int:
    ks = {cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim}
    if requested is not None:
        bad = sorted(k for k in ks if k % requested)
        if bad:
            fit = [g for g in (128, 64, 32) if all(k % g == 0 for k in ks)]
            hint = f"; use --group-size {fit[0]}" if fit else ""
            raise QuantizeError(f"layer width {bad[0]} is not a multiple of --group-size {requested} (the AutoAWQ "
                                f"layout needs in_features % group_size == 0){hint}")
        return requested
    for g in (128, 64, 32):
        if all(k % g == 0 for k in ks):
            return g
    raise QuantizeError(f"layer widths {sorted(ks)} fit no AWQ group size (128, 64, 32)")


# ------------------------------------------------------------------ calibration inputs

def _embed_weight(store: TensorStore, device, dtype) -> torch.Tensor:
    for key in store.keys():
        if key.endswith("embed_tokens.weight"):
            return store.get(key).to(device=device, dtype=dtype)
    raise QuantizeError(f"no token embeddings (*embed_tokens.weight) in {store.folder}")


def calibration_inputs(source: Source, store: TensorStore, settings: QuantizeSettings, device, dtype):
    """Hidden states entering layer 0 for every calibration sample: [n_samples, seqlen, hidden]."""
    from edge_vlm.tokenizer import Tokenizer

    tok = Tokenizer(source.llm_dir)
    if settings.calib:
        text, name = read_calibration_file(settings.calib), str(settings.calib)
    else:
        text, name = default_calibration_text(), "the built-in calibration text (pydoc_data)"
    image_embeds = None
    text_len = settings.seqlen
    if settings.calib_images:
        if source.layout == "llm":
            raise QuantizeError("--calib-images needs a vision-language model (VILA or LLaVA folder)")
        from .visual import image_embeddings

        image_embeds = image_embeddings(source, list_images(settings.calib_images), device, dtype)
        text_len = settings.seqlen - image_embeds.shape[1]
        if text_len < 16:
            raise QuantizeError(f"--seqlen {settings.seqlen} leaves no room for text after "
                                f"{image_embeds.shape[1]} image tokens")
    ids = calibration_blocks(tok.encode(text), settings.n_samples, text_len, name)
    emb = _embed_weight(store, device, dtype)
    x = emb[ids.to(device)]
    if image_embeds is not None:  # every sample: one image's tokens, then text
        imgs = image_embeds[torch.arange(settings.n_samples) % image_embeds.shape[0]]
        x = torch.cat([imgs.to(dtype), x], dim=1)
    return x


# ------------------------------------------------------------------ writing

def _gemm_tensors(module: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """`module`.qweight [K, N/8], .qzeros [K/G, N/8], .scales [K/G, N] fp16: the AutoAWQ GEMM layout."""
    return {f"{module}.{name}": t for name, t in pack_gemm(qw.q.t(), qw.zeros.t(), qw.scales.t()).items()}


def _layer_tensors(prefix: str, i: int, layer: DecoderLayer, result: LayerResult) -> dict[str, torch.Tensor]:
    """The shard of layer i: packed int4 linears (+bias) and the (scale-folded) norms, in fp16."""
    out = {}
    quantized = set(result.weights)
    for name, qw in result.weights.items():
        out.update(_gemm_tensors(f"{prefix}{i}.{name}", qw))
    for pname, p in layer.named_parameters():
        module = pname.rsplit(".", 1)[0]
        if module in quantized and pname.endswith(".weight"):
            continue
        out[f"{prefix}{i}.{pname}"] = p.detach().to("cpu", torch.float16).contiguous()
    return out


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _embedding_key(prefix: str) -> str:
    """The token-embedding key beside the layers under `prefix`: model.layers. -> model.embed_tokens.weight."""
    return prefix.replace("layers.", "embed_tokens.weight")


def _lm_head_source(store: TensorStore, prefix: str) -> tuple[str, str]:
    """(key holding the output projection, name of the int4 lm_head module to write).

    The key is the embedding when the two are tied; the name follows the checkpoint's layout
    (`lm_head`, or `language_model.lm_head` in older LLaVA folders).
    """
    base = "language_model.lm_head" if prefix.startswith("language_model.") else "lm_head"
    if base + ".weight" in store:
        return base + ".weight", base
    return _embedding_key(prefix), base


def _copy_rest(store: TensorStore, prefix: str, dest: Path, lm_head_group: int | None = None,
               embedding: bool = False) -> dict[str, str]:
    """Every tensor outside the decoder layers, unchanged, into one shard.

    With `lm_head_group`, lm_head is written as int4 under `lm_head.{qweight,qzeros,scales}`,
    by round-to-nearest (no AWQ scale search for it yet). With `embedding`, the token
    embeddings are written as int8 under `embed_tokens.{qweight,scales}`.
    """
    from edge_vlm.quant_linear import quantize_embedding_int8

    rest = {}
    head_key, head = _lm_head_source(store, prefix) if lm_head_group else (None, None)
    emb_key = _embedding_key(prefix)
    for key in store.keys():
        if embedding and key == emb_key:
            q, scales = quantize_embedding_int8(store.get(key))
            rest[key[:-len("weight")] + "qweight"], rest[key[:-len("weight")] + "scales"] = q, scales
        elif not key.startswith(prefix) and key != f"{head}.weight":
            t = store.get(key)
            rest[key] = t.clone() if t.is_floating_point() else t  # clone: tied tensors share storage
    if head_key:
        rest.update(_gemm_tensors(head, quantize_weight(store.get(head_key).float(), lm_head_group)))
    name = "model-rest.safetensors"
    _save(rest, dest / name)
    return {k: name for k in rest}


def _copy_non_weight_files(src: Path, dest: Path, skip: set[str]) -> None:
    for p in src.iterdir():
        if p.name in skip or p.name in WEIGHT_INDEXES or p.suffix in WEIGHT_SUFFIXES:
            continue
        target = dest / p.name
        if p.is_dir():
            shutil.copytree(p, target, dirs_exist_ok=True)
        else:
            shutil.copy2(p, target)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def quantization_config(source: Source, group_size: int, w_bit: int, lm_head: bool = False,
                        embedding: bool = False) -> dict:
    skip = [] if lm_head else ["lm_head"]
    if source.layout == "llava":
        skip += ["vision_tower", "multi_modal_projector"]
    conf = {"quant_method": "awq", "bits": w_bit, "group_size": group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": skip}
    if lm_head:
        conf["quantize_lm_head"] = True  # our extension: AutoAWQ readers keep lm_head 16-bit
    if embedding:
        conf["quantize_embedding"] = True  # our extension: int8 embed_tokens.{qweight,scales}
    return conf


# ------------------------------------------------------------------ the run

def _settings_key(source: Source, settings: QuantizeSettings, group: int) -> dict:
    d = asdict(settings)
    d.pop("device")
    d["group_size"] = group
    d["src"] = str(source.folder.resolve())
    return d


def _default_device(requested: str | None) -> str:
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise QuantizeError("--device cuda requested but no CUDA GPU is available; use --device cpu")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def quantize_checkpoint(src, out, settings: QuantizeSettings | None = None, resume: bool = False,
                        force: bool = False, progress: bool = True, log=None) -> Summary:
    settings = settings or QuantizeSettings()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if settings.method not in ("awq", "rtn"):
        raise QuantizeError(f"unknown method {settings.method!r}; use awq or rtn")
    if settings.w_bit != 4:
        raise QuantizeError("only --w-bit 4 is supported")
    source = inspect_source(src)
    out = Path(out).expanduser()
    partial = out.with_name(out.name + ".partial")
    if out.exists() and not force:
        raise QuantizeError(f"output {out} already exists; pass --force to replace it")
    if partial.exists() and not (resume or force):
        raise QuantizeError(f"an unfinished run left {partial}; pass --resume to continue it or --force to start over")
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    cfg = LLMConfig.from_hf(source.llm_config)
    if settings.quantize_embedding and cfg.tie_word_embeddings and not settings.quantize_lm_head:
        raise QuantizeError("this model's lm_head shares the embedding table: --quantize-embedding needs "
                            "--quantize-lm-head too")
    group = _pick_group_size(cfg, settings.group_size)
    if settings.group_size is None and group != 128:
        log(f"note: layer widths are not multiples of 128; using group size {group}")
    device = _default_device(settings.device)
    dtype = torch.float32 if device == "cpu" else torch.float16
    store = TensorStore(source.llm_dir)
    prefix = _layer_prefix(store)
    llm_out = partial / "llm" if source.layout == "vila" else partial
    key = _settings_key(source, settings, group)
    state_path = partial / "progress.json"

    done, losses, elapsed = 0, [], 0.0
    if resume and state_path.is_file():
        state = json.loads(state_path.read_text())
        if state["settings"] != key:
            raise QuantizeError(f"{partial} was started with other settings; pass --force to start over")
        done, losses, elapsed = state["layers_done"], state["losses"], state["elapsed_s"]
        log(f"resuming after layer {done - 1} of {cfg.num_layers}")
    elif resume:
        log("note: nothing to resume; starting from the first layer")
    llm_out.mkdir(parents=True, exist_ok=True)

    try:
        return _run(source, out, partial, llm_out, settings, cfg, group, device, dtype, store, prefix, key,
                    done, losses, elapsed, progress)
    except BaseException:
        if not state_path.is_file():  # no layer finished: nothing worth resuming, leave nothing behind
            shutil.rmtree(partial, ignore_errors=True)
        raise


def _run(source, out, partial, llm_out, settings, cfg, group, device, dtype, store, prefix, key,
         done, losses, elapsed, progress) -> Summary:
    state_path, acts_path = partial / "progress.json", partial / "activations.pt"
    t0 = time.perf_counter()
    opts = AWQOptions(group_size=group, bits=settings.w_bit, clip=settings.clip, duo_scaling=settings.duo_scaling,
                      search_tokens=settings.search_tokens)
    step = "preparing the calibration data"
    try:
        x = None
        if settings.method == "awq":
            if done:
                if not acts_path.is_file():
                    raise QuantizeError(f"{partial} lacks the calibration state of layer {done}; "
                                        f"pass --force to start over")
                x = torch.load(acts_path, map_location=device, weights_only=True)
            else:
                x = calibration_inputs(source, store, settings, device, dtype)
            runner = LayerRunner(cfg, x.shape[1], device)
        bar = tqdm(range(done, cfg.num_layers), desc=f"{settings.method.upper()} layers", unit="layer",
                   initial=done, total=cfg.num_layers, file=sys.stderr, disable=not progress)
        for i in bar:
            step = f"loading layer {i}"
            with torch.device("meta"):
                layer = DecoderLayer(cfg)
            lp = f"{prefix}{i}."
            load_into(layer, store, lambda k, lp=lp: k[len(lp):] if k.startswith(lp) else None, dtype, device)
            step = f"quantizing layer {i}"
            if settings.method == "awq":
                result, x = quantize_layer_awq(layer, cfg, x, runner, opts)
                losses.append(result.loss)
                bar.set_postfix(loss=f"{result.loss:.2e}")
            else:
                result = quantize_layer_rtn(layer, opts)
            step = f"writing layer {i}"
            _save(_layer_tensors(prefix, i, layer, result), llm_out / f"model-layer-{i:03d}.safetensors")
            if x is not None:
                torch.save(x, acts_path.with_suffix(".tmp"))
                os.replace(acts_path.with_suffix(".tmp"), acts_path)
            state_path.write_text(json.dumps({"settings": key, "layers_done": i + 1, "losses": losses,
                                              "elapsed_s": elapsed + time.perf_counter() - t0}))
            del layer
        step = "writing the output folder"
        _finish(source, store, prefix, cfg, llm_out, partial, group, settings.w_bit, settings.quantize_lm_head,
                settings.quantize_embedding)
    except torch.OutOfMemoryError:
        raise QuantizeError(f"out of memory on {device} while {step}; try --device cpu or fewer --n-samples "
                            f"(finished layers are kept: rerun with --resume)") from None
    except (MemoryError, RuntimeError) as e:  # CPU allocation failures arrive as RuntimeError
        if isinstance(e, RuntimeError) and not any(m in str(e) for m in ("can't allocate memory", "out of memory")):
            raise
        raise QuantizeError(f"out of memory while {step}; try fewer --n-samples or a shorter --seqlen "
                            f"(finished layers are kept: rerun with --resume)") from None
    for p in (state_path, acts_path):
        p.unlink(missing_ok=True)
    if out.exists():  # --force: the old folder goes only once the new one is complete
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, out)
    before = _folder_bytes(source.folder) if source.layout != "llm" else store.nbytes()
    after = _folder_bytes(out) if source.layout != "llm" else sum(
        p.stat().st_size for p in out.glob("*.safetensors"))
    return Summary(str(source.folder), str(out), settings.method, group, before, after,
                   elapsed + time.perf_counter() - t0, losses)


def _finish(source: Source, store: TensorStore, prefix: str, cfg: LLMConfig, llm_out: Path, partial: Path,
            group: int, w_bit: int, lm_head: bool = False, embedding: bool = False) -> None:
    weight_map = _copy_rest(store, prefix, llm_out, group if lm_head else None, embedding)
    total = 0
    from safetensors import safe_open

    for i in range(cfg.num_layers):
        name = f"model-layer-{i:03d}.safetensors"
        with safe_open(str(llm_out / name), "pt") as f:
            for k in f.keys():
                weight_map[k] = name
    for p in llm_out.glob("model-*.safetensors"):
        total += p.stat().st_size
    (llm_out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    _copy_non_weight_files(source.llm_dir, llm_out, skip={"config.json", "llm", "vision_tower", "mm_projector"}
                           if source.layout != "vila" else {"config.json"})
    conf = read_json(source.config_path)
    conf["quantization_config"] = quantization_config(source, group, w_bit, lm_head, embedding)
    if lm_head:  # an int4 lm_head no longer shares the embedding's storage
        (conf["text_config"] if source.layout == "llava" else conf)["tie_word_embeddings"] = False
    (llm_out / "config.json").write_text(json.dumps(conf, indent=2))
    if source.layout == "vila":  # vision tower, projector and top-level files, untouched
        _copy_non_weight_files(source.folder, partial, skip={"llm", "config.json"})  # copies sub-folders whole
        shutil.copy2(source.folder / "config.json", partial / "config.json")
