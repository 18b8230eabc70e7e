"""`quantize_checkpoint`: a 16-bit checkpoint folder -> an AWQ (or RTN) 4-bit folder.

Streams the LLM one decoder layer at a time: only that layer's weights and the calibration
hidden states are in memory. Every finished layer is written as its own file in
`OUT.partial/resume/` together with the hidden states after it, so an interrupted run resumes
from the last finished layer (`resume=True`). When all layers are done the tensors are written
as Hugging Face-style shards of at most `max_shard_bytes` (one `model.safetensors`, or
`model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`), the resume files are
removed, and the folder is renamed to OUT.

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

from edge_vlm.formats.int4_formats import pack_gemm
from edge_vlm.formats.checkpoint import TensorStore, load_into, read_json
from edge_vlm.formats.configs import LLMConfig, QuantConfig
from edge_vlm.errors import EdgeVLMError
from edge_vlm.models.llm import DecoderLayer
from edge_vlm.formats.layout import CheckpointLayout, detect_layout

from .awq import AWQOptions, LayerRunner, LayerResult, quantize_layer_awq, quantize_layer_rtn
from .calibration import builtin_blocks, calibration_blocks, list_images, read_calibration_file
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
    calib: str | None = None         # .txt / .jsonl; None: the built-in mix (prose, code, chat, readmes)
    calib_images: str | None = None  # folder of images (VLM sources)
    device: str | None = None
    clip: bool = True                # clipping search (each group's grid, for either rounding)
    duo_scaling: bool = True
    search_tokens: int = 4096        # calibration tokens scoring each MLP scale candidate (cost ~ linear)
    rounding: str = "gptq"           # after the AWQ scales: "gptq" error compensation on clipped grids (the
                                     # default: it recovered most on held-out domains, RESULTS.md) or "rtn"
    hessian: bool = True             # losses of linear blocks from X^T X (False: the original token-sample search)
    clip_damp: float = 0.0           # regularises the clipping search toward no clipping
    hessian_tokens: int = 65536      # calibration tokens summed into each linear's X^T X (128 x 512: all of them)
    gptq_damp: float = 0.01          # GPTQ's damping of H (fraction of its mean diagonal)
    max_shard_bytes: int = 2 * 10**9  # output shards, like Hugging Face's save_pretrained
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
    calibration: list[str] = field(default_factory=list)  # one line per calibration source
    shards: list[str] = field(default_factory=list)

    def text(self) -> str:
        mb = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
        lines = [f"quantized {self.src} -> {self.out}",
                 f"method {self.method.upper()} w4 g{self.group_size}; size {mb(self.bytes_before)} -> "
                 f"{mb(self.bytes_after)} ({self.bytes_before / max(self.bytes_after, 1):.2f}x smaller); "
                 f"time {self.seconds:.1f} s"]
        if self.calibration:
            lines.append("calibration: " + "; ".join(self.calibration))
        if self.shards:
            lines.append(f"weights: {', '.join(self.shards)}")
        if self.method != "rtn" and self.layer_losses:
            lines.append("calibration loss per layer (|out_q - out_16bit|^2 / |layer update|^2):")
            for i in range(0, len(self.layer_losses), 6):
                lines.append("  " + "  ".join(f"{i + j:>3}: {v:.2e}" for j, v in enumerate(self.layer_losses[i:i + 6])))
        return "\n".join(lines)


# ------------------------------------------------------------------ source layouts

def inspect_source(src) -> CheckpointLayout:
    """The layout of a checkpoint we can quantize: a supported one that is still 16-bit."""
    layout = detect_layout(src)
    if layout.quantization:
        raise QuantizeError(f"{layout.folder} is already quantized (its config has a quantization_config)")
    return layout


def _check_has_layers(store: TensorStore, prefix: str) -> None:
    if prefix + "0.input_layernorm.weight" not in store:
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

def _embed_weight(layout: CheckpointLayout, store: TensorStore, device, dtype) -> torch.Tensor:
    key = layout.llm_prefix + "embed_tokens.weight"
    if key not in store:
        raise QuantizeError(f"no token embeddings (*embed_tokens.weight) in {store.folder}")
    return store.get(key).to(device=device, dtype=dtype)


def chat_template_of(tok, arch: str):
    """The model's own chat template (the checkpoint's, else the built-in one the runtime picks)."""
    from edge_vlm.chat_template import ChatTemplate, default_template_name

    if tok.chat_template:
        return ChatTemplate(tok.chat_template, "checkpoint", tok.bos_token, tok.eos_token)
    return ChatTemplate.builtin(default_template_name(arch, tok), tok.bos_token, tok.eos_token)


def calibration_inputs(layout: CheckpointLayout, store: TensorStore, settings: QuantizeSettings, device, dtype,
                       sources: list[str] | None = None):
    """Hidden states entering layer 0 for every calibration sample: [n_samples, seqlen, hidden].
    `sources` receives one line per calibration source used."""
    from edge_vlm.tokenizer import Tokenizer

    tok = Tokenizer(layout.llm_dir)
    sources = [] if sources is None else sources
    emb = _embed_weight(layout, store, device, dtype)
    images = None
    text_len = settings.seqlen
    if settings.calib_images:
        if not layout.multimodal:
            raise QuantizeError("--calib-images needs a vision-language model (VILA, LLaVA or InternVL folder)")
        from .visual import image_sequences

        paths = list_images(settings.calib_images)
        embed = lambda ids: emb[torch.tensor(ids, dtype=torch.long, device=device)]  # noqa: E731
        images, what = image_sequences(layout, paths, device, dtype, embed, settings.seqlen - 16)
        longest = max(len(s) for s in images)
        if settings.seqlen - longest < 16:
            raise QuantizeError(f"--seqlen {settings.seqlen} leaves no room for text after "
                                f"{longest} image tokens")
        text_len = settings.seqlen - min(len(s) for s in images)  # each sample's text is cut to fill seqlen
    if settings.calib:
        ids = calibration_blocks(tok.encode(read_calibration_file(settings.calib)), settings.n_samples, text_len,
                                 str(settings.calib))
        sources.append(f"{settings.n_samples} x {text_len} tokens of {settings.calib}")
    else:
        ids, lines = builtin_blocks(tok.encode, settings.n_samples, text_len,
                                    chat_template_of(tok, layout.llm.arch))
        sources += lines
    x = emb[ids.to(device)]
    if images is None:
        return x
    sources.append(f"image tokens of {len(images)} images from {settings.calib_images} ({what})")
    # every sample: one image's rows (round robin), then text up to seqlen
    rows = [images[i % len(images)].to(dtype) for i in range(settings.n_samples)]
    return torch.stack([torch.cat([img, x[i, :settings.seqlen - len(img)]]) for i, img in enumerate(rows)])


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


def _rest_tensors(layout: CheckpointLayout, store: TensorStore, lm_head_group: int | None = None,
                  embedding: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor outside the decoder layers, unchanged.

    With `lm_head_group`, lm_head is written as int4 under `lm_head.{qweight,qzeros,scales}`
    (beside the checkpoint's own lm_head keys), by round-to-nearest (no AWQ scale search for it
    yet); its weight is the embedding's when the two are tied. With `embedding`, the token
    embeddings are written as int8 under `embed_tokens.{qweight,scales}`.
    """
    from edge_vlm.models.quant_linear import quantize_embedding_int8

    rest = {}
    emb_key = layout.llm_prefix + "embed_tokens.weight"
    head = layout.head_prefix + "lm_head" if lm_head_group else None
    for key in store.keys():
        if embedding and key == emb_key:
            q, scales = quantize_embedding_int8(store.get(key))
            rest[key[:-len("weight")] + "qweight"], rest[key[:-len("weight")] + "scales"] = q, scales
        elif not key.startswith(layout.layer_prefix) and key != f"{head}.weight":
            t = store.get(key)
            rest[key] = t.clone() if t.is_floating_point() else t  # clone: tied tensors share storage
    if head:
        head_key = head + ".weight" if head + ".weight" in store else emb_key
        rest.update(_gemm_tensors(head, quantize_weight(store.get(head_key).float(), lm_head_group)))
    return rest


def write_shards(parts, folder: Path, max_bytes: int) -> list[str]:
    """Tensors (an iterable of dicts, in order) as shards of at most `max_bytes` (a bigger tensor gets a
    shard of its own), named like Hugging Face's: `model.safetensors` alone, or
    `model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for part in parts:
        for key, t in part.items():
            n = t.numel() * t.element_size()
            if shards[-1] and size + n > max_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = t
            size += n
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, tensors in zip(names, shards):
        _save(tensors, folder / name)
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    return names


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


def quantization_config(layout: CheckpointLayout, settings: QuantizeSettings, group_size: int) -> QuantConfig:
    """What the output's config says: the LLM's linears in int4, lm_head too only when asked."""
    skip = [] if settings.quantize_lm_head else ["lm_head"]
    if layout.kind in ("llava", "internvl"):  # their module names, as transformers / vLLM match them
        skip += [p.rstrip(".").rsplit(".", 1)[-1] for p in (layout.vision_prefix, layout.projector_prefix)]
    return QuantConfig(bits=settings.w_bit, group_size=group_size, modules_to_not_convert=tuple(skip),
                       quantize_lm_head=settings.quantize_lm_head, quantize_embedding=settings.quantize_embedding)


# ------------------------------------------------------------------ the run

def _settings_key(layout: CheckpointLayout, settings: QuantizeSettings, group: int) -> dict:
    """What a resumed run must share with the run it continues."""
    d = asdict(settings)
    d.pop("device")
    d["group_size"] = group
    d["src"] = str(layout.folder.resolve())
    return d


def _default_device(requested: str | None) -> str:
    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise QuantizeError("--device cuda requested but no CUDA GPU is available; use --device cpu")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_settings(settings: QuantizeSettings) -> None:
    if settings.method not in ("awq", "rtn", "gptq"):
        raise QuantizeError(f"unknown method {settings.method!r}; use awq, gptq or rtn")
    if settings.rounding not in ("gptq", "rtn"):
        raise QuantizeError(f"unknown rounding {settings.rounding!r}; use gptq or rtn")
    if settings.w_bit != 4:
        raise QuantizeError("only --w-bit 4 is supported")


def _prepare_output(out: Path, resume: bool, force: bool) -> Path:
    """The `OUT.partial` folder this run writes into, after refusing to overwrite what it must not."""
    partial = out.with_name(out.name + ".partial")
    if out.exists() and not force:
        raise QuantizeError(f"output {out} already exists; pass --force to replace it")
    if partial.exists() and not (resume or force):
        raise QuantizeError(f"an unfinished run left {partial}; pass --resume to continue it or --force to start over")
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    return partial


@dataclass
class _Progress:
    """What `progress.json` keeps between runs: finished layers, their losses, time spent."""

    layers_done: int = 0
    losses: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    calibration: list[str] = field(default_factory=list)


@dataclass
class _Run:
    """One quantization run: everything decided before the first layer, and its steps."""

    layout: CheckpointLayout
    settings: QuantizeSettings
    out: Path
    partial: Path
    group: int
    device: str
    dtype: torch.dtype
    store: TensorStore
    key: dict  # _settings_key
    progress: _Progress
    step: str = "preparing the calibration data"  # named by out-of-memory errors
    started: float = field(default_factory=time.perf_counter)
    sources: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)

    @property
    def cfg(self) -> LLMConfig:
        return self.layout.llm

    @property
    def llm_out(self) -> Path:
        return self.partial / "llm" if self.layout.kind == "vila" else self.partial

    @property
    def state_path(self) -> Path:
        return self.partial / "progress.json"

    @property
    def resume_dir(self) -> Path:
        """Per-layer files of the finished layers: resume state, removed when the run completes."""
        return self.partial / "resume"

    def layer_path(self, i: int) -> Path:
        return self.resume_dir / f"layer-{i:03d}.safetensors"

    @property
    def acts_path(self) -> Path:
        """The hidden states after the last finished layer (AWQ only): the next layer's input."""
        return self.partial / "activations.pt"

    def elapsed(self) -> float:
        return self.progress.elapsed_s + time.perf_counter() - self.started

    def options(self) -> AWQOptions:
        s = self.settings
        gptq = s.method == "gptq"
        return AWQOptions(group_size=self.group, bits=s.w_bit, clip=s.clip, duo_scaling=s.duo_scaling,
                          search_tokens=s.search_tokens, hessian=s.hessian, clip_damp=s.clip_damp,
                          hessian_tokens=s.hessian_tokens, gptq_damp=s.gptq_damp,
                          scale_search=not gptq, rounding="gptq" if gptq else s.rounding)

    def first_inputs(self) -> torch.Tensor:
        """Layer `layers_done`'s calibration input: saved by the run we resume, or computed."""
        done = self.progress.layers_done
        if not done:
            return calibration_inputs(self.layout, self.store, self.settings, self.device, self.dtype, self.sources)
        if not self.acts_path.is_file():
            raise QuantizeError(f"{self.partial} lacks the calibration state of layer {done}; "
                                f"pass --force to start over")
        return torch.load(self.acts_path, map_location=self.device, weights_only=True)

    def load_layer(self, i: int) -> DecoderLayer:
        with torch.device("meta"):
            layer = DecoderLayer(self.cfg)
        lp = f"{self.layout.layer_prefix}{i}."
        load_into(layer, self.store, lambda k: k[len(lp):] if k.startswith(lp) else None, self.dtype, self.device)
        return layer

    def save_layer(self, i: int, layer: DecoderLayer, result: LayerResult, x: torch.Tensor | None) -> None:
        """Layer i's shard, then (atomically) the state a resumed run starts from."""
        self.resume_dir.mkdir(parents=True, exist_ok=True)
        _save(_layer_tensors(self.layout.layer_prefix, i, layer, result), self.layer_path(i))
        if x is not None:
            torch.save(x, self.acts_path.with_suffix(".tmp"))
            os.replace(self.acts_path.with_suffix(".tmp"), self.acts_path)
        self.state_path.write_text(json.dumps({"settings": self.key, "layers_done": i + 1,
                                               "losses": self.progress.losses, "elapsed_s": self.elapsed(),
                                               "calibration": self.sources}))

    def quantize_layers(self, show: bool) -> None:
        awq = self.settings.method != "rtn"  # awq and gptq calibrate
        opts = self.options()
        x = self.first_inputs() if awq else None
        runner = LayerRunner(self.cfg, x.shape[1], self.device) if awq else None
        done = self.progress.layers_done
        bar = tqdm(range(done, self.cfg.num_layers), desc=f"{self.settings.method.upper()} layers", unit="layer",
                   initial=done, total=self.cfg.num_layers, file=sys.stderr, disable=not show)
        for i in bar:
            self.step = f"loading layer {i}"
            layer = self.load_layer(i)
            self.step = f"quantizing layer {i}"
            if awq:
                result, x = quantize_layer_awq(layer, self.cfg, x, runner, opts)
                self.progress.losses.append(result.loss)
                bar.set_postfix(loss=f"{result.loss:.2e}")
            else:
                result = quantize_layer_rtn(layer, opts)
            self.step = f"writing layer {i}"
            self.save_layer(i, layer, result, x)
            del layer

    def write_rest(self) -> None:
        """Everything but the decoder layers: the other tensors, index, config, tokenizer, VLM parts."""
        self.step = "writing the output folder"
        from safetensors.torch import load_file

        lm_head = self.settings.quantize_lm_head
        layers = (load_file(str(self.layer_path(i))) for i in range(self.cfg.num_layers))
        rest = _rest_tensors(self.layout, self.store, self.group if lm_head else None, self.settings.quantize_embedding)
        self.shards = write_shards(_chain(layers, [rest]), self.llm_out, self.settings.max_shard_bytes)
        layout = self.layout
        _copy_non_weight_files(layout.llm_dir, self.llm_out,
                               skip={"config.json"} if layout.kind == "vila"
                               else {"config.json", "llm", "vision_tower", "mm_projector"})
        conf = read_json(layout.config_path)
        conf["quantization_config"] = quantization_config(layout, self.settings, self.group).to_hf()
        if lm_head:  # an int4 lm_head no longer shares the embedding's storage
            layout.llm_section(conf)["tie_word_embeddings"] = False
        (self.llm_out / "config.json").write_text(json.dumps(conf, indent=2))
        if layout.kind == "vila":  # vision tower, projector and top-level files, untouched
            _copy_non_weight_files(layout.folder, self.partial, skip={"llm", "config.json"})  # sub-folders whole
            shutil.copy2(layout.folder / "config.json", self.partial / "config.json")

    def publish(self) -> None:
        """OUT.partial becomes OUT; with --force the old OUT goes only once the new one is complete."""
        for p in (self.state_path, self.acts_path):
            p.unlink(missing_ok=True)
        shutil.rmtree(self.resume_dir, ignore_errors=True)
        if self.out.exists():
            old = self.out.with_name(self.out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
            os.replace(self.partial, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.partial, self.out)

    def summary(self) -> Summary:
        if self.layout.multimodal:
            before, after = _folder_bytes(self.layout.folder), _folder_bytes(self.out)
        else:
            before, after = self.store.nbytes(), sum(p.stat().st_size for p in self.out.glob("*.safetensors"))
        return Summary(str(self.layout.folder), str(self.out), self.settings.method, self.group, before, after,
                       self.elapsed(), self.progress.losses, self.sources, self.shards)


def _chain(*iterables):
    for it in iterables:
        yield from it


class _OutOfMemory:
    """Turns running out of memory into one line that names the step and how to go on."""

    def __init__(self, run: _Run):
        self.run = run

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if isinstance(e, torch.OutOfMemoryError):
            raise QuantizeError(f"out of memory on {self.run.device} while {self.run.step}; try --device cpu or "
                                f"fewer --n-samples (finished layers are kept: rerun with --resume)") from None
        # CPU allocation failures arrive as RuntimeError
        if isinstance(e, MemoryError) or isinstance(e, RuntimeError) and any(
                m in str(e) for m in ("can't allocate memory", "out of memory")):
            raise QuantizeError(f"out of memory while {self.run.step}; try fewer --n-samples or a shorter --seqlen "
                                f"(finished layers are kept: rerun with --resume)") from None
        return False


def _resume_state(run_key: dict, state_path: Path, resume: bool, num_layers: int, log) -> _Progress:
    if resume and state_path.is_file():
        state = json.loads(state_path.read_text())
        if state["settings"] != run_key:
            raise QuantizeError(f"{state_path.parent} was started with other settings; pass --force to start over")
        log(f"resuming after layer {state['layers_done'] - 1} of {num_layers}")
        return _Progress(state["layers_done"], state["losses"], state["elapsed_s"], state.get("calibration", []))
    if resume:
        log("note: nothing to resume; starting from the first layer")
    return _Progress()


def quantize_checkpoint(src, out, settings: QuantizeSettings | None = None, resume: bool = False,
                        force: bool = False, progress: bool = True, log=None) -> Summary:
    settings = settings or QuantizeSettings()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    _check_settings(settings)
    layout = inspect_source(src)
    out = Path(out).expanduser()
    partial = _prepare_output(out, resume, force)
    cfg = layout.llm
    if settings.quantize_embedding and cfg.tie_word_embeddings and not settings.quantize_lm_head:
        raise QuantizeError("this model's lm_head shares the embedding table: --quantize-embedding needs "
                            "--quantize-lm-head too")
    group = _pick_group_size(cfg, settings.group_size)
    if settings.group_size is None and group != 128:
        log(f"note: layer widths are not multiples of 128; using group size {group}")
    device = _default_device(settings.device)
    dtype = torch.float32 if device == "cpu" else torch.float16
    store = TensorStore(layout.llm_dir)
    _check_has_layers(store, layout.layer_prefix)
    key = _settings_key(layout, settings, group)
    state = _resume_state(key, partial / "progress.json", resume, cfg.num_layers, log)
    run = _Run(layout, settings, out, partial, group, device, dtype, store, key, state, sources=state.calibration)
    run.llm_out.mkdir(parents=True, exist_ok=True)
    try:
        with _OutOfMemory(run):
            run.quantize_layers(progress)
            run.write_rest()
        run.publish()
        return run.summary()
    except BaseException:
        if not run.state_path.is_file():  # no layer finished: nothing worth resuming, leave nothing behind
            shutil.rmtree(partial, ignore_errors=True)
        raise
