"""Where the parts of a checkpoint folder live: the one reading of a folder's layout, shared by
`load_model` and `edge-vlm quantize`.

Layouts:
- VILA: `config.json` (model_type llava_llama) with `llm/`, `vision_tower/`, `mm_projector/`
  sub-folders, each a Hugging Face folder of its own;
- LLaVA single folder, as transformers' LlavaForConditionalGeneration saves it (text_config +
  vision_config; keys under `model.language_model.` or the older `language_model.model.`);
- InternVL / NVLM-D (InternViT tower, pixel shuffle + `mlp1`, dynamic tiling) in three layouts:
  NVLM-D's repo (`NVLM_D`) and InternVL's original one (`internvl_chat`), both `vision_model.*`,
  `mlp1.*`, `language_model.*` with `llm_config` + `vision_config`, and transformers' native
  `-hf` one (`internvl`: `model.vision_tower.*`, `model.multi_modal_projector.*`, ...);
- a plain Llama / Qwen2 / Nemotron LLM folder (text-only chat).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, UnsupportedModelError
from .checkpoint import TensorStore, read_json, resolve_model_path
from .configs import SUPPORTED_LLMS, LLMConfig, QuantConfig

SUPPORTED_LAYOUTS = ("VILA (llava_llama), LLaVA (llava), InternVL (internvl_chat, internvl) and NVLM-D (NVLM_D), "
                     "or a Llama / Qwen2 / Nemotron LLM folder")
INTERNVL_KINDS = ("internvl_chat", "NVLM_D", "internvl")

# ------------------------------------------------------------------ checkpoint layouts

@dataclass(frozen=True)
class CheckpointLayout:
    """Where the parts of a checkpoint folder live: the one reading of a folder's layout, shared by
    `load_model` and `edge-vlm quantize`.

    LLM keys are `{llm_prefix}embed_tokens.*`, `{llm_prefix}layers.N.*`, `{llm_prefix}norm.*` and
    `{head_prefix}lm_head.*`; the vision tower's keys start with `vision_prefix` in `vision_dir`,
    the projector's with `projector_prefix` in `projector_dir` (None for a text-only LLM).
    """

    kind: str          # "vila", "llava", "internvl" (InternVL and NVLM-D, every layout) or "llm"
    folder: Path
    config: dict       # the folder's config.json
    llm_dir: Path      # the LLM's weights and tokenizer
    llm_config: dict   # the LLM's own config (VILA: llm/config.json, LLaVA: text_config)
    config_path: Path  # the config.json that holds (or receives) the LLM's quantization_config
    llm: LLMConfig
    llm_prefix: str = "model."
    head_prefix: str = ""
    vision_dir: Path | None = None
    vision_prefix: str = ""
    projector_dir: Path | None = None
    projector_prefix: str = ""

    @property
    def multimodal(self) -> bool:
        return self.vision_dir is not None

    @property
    def layer_prefix(self) -> str:
        """The key prefix of decoder layer N, less the N: `model.layers.` in most folders."""
        return self.llm_prefix + "layers."

    @property
    def quantization(self) -> dict | None:
        """The LLM's `quantization_config` as written (None: a 16-bit checkpoint)."""
        own = self.llm_config if self.kind == "vila" else self.config  # the dict at config_path
        return QuantConfig.section_of(own) or QuantConfig.section_of(self.llm_config)

    def llm_section(self, config: dict) -> dict:
        """The LLM's part of the dict read from `config_path` (LLaVA nests it under text_config)."""
        if self.kind == "internvl":
            return config["text_config"] if "text_config" in config else config["llm_config"]
        return config["text_config"] if self.kind == "llava" else config

    def llm_key(self, key: str) -> str | None:
        """The DecoderLM parameter name of a checkpoint key; None for keys outside the LLM."""
        if key.startswith(self.llm_prefix):
            return key[len(self.llm_prefix):]
        if key.startswith(self.head_prefix + "lm_head."):
            return key[len(self.head_prefix):]
        return None


def _llm_config(d: dict) -> LLMConfig:
    try:
        return LLMConfig.from_hf(d)
    except KeyError as e:
        raise CheckpointError(f"language model config lacks {e.args[0]!r}") from None


def detect_layout(name_or_path) -> CheckpointLayout:
    """Resolve a folder (or Hub repo id) and say which supported layout it is; the LLM config is checked."""
    folder = resolve_model_path(name_or_path)
    top = read_json(folder / "config.json")
    kind = top.get("model_type")
    if kind == "llava_llama" or (folder / "llm" / "config.json").is_file():
        return _vila_layout(folder, top)
    if kind == "llava" and "text_config" in top:
        return _llava_layout(folder, top)
    if kind in INTERNVL_KINDS:
        return _internvl_layout(folder, top)
    if kind in SUPPORTED_LLMS:
        return CheckpointLayout("llm", folder, top, folder, top, folder / "config.json", _llm_config(top))
    raise UnsupportedModelError(f"unsupported model type {kind!r} in {folder}; supported: {SUPPORTED_LAYOUTS}")


def _vila_layout(folder: Path, top: dict) -> CheckpointLayout:
    for sub in ("llm", "vision_tower", "mm_projector"):
        if not (folder / sub).is_dir():
            raise CheckpointError(f"VILA checkpoint {folder} lacks the {sub}/ folder")
    llm_top = read_json(folder / "llm" / "config.json")
    return CheckpointLayout("vila", folder, top, folder / "llm", llm_top, folder / "llm" / "config.json",
                            _llm_config(llm_top), vision_dir=folder / "vision_tower",
                            projector_dir=folder / "mm_projector")


def _hf_vlm_prefixes(folder: Path) -> dict:
    """Key prefixes of a transformers VLM folder (LLaVA, InternVL -hf): transformers >= 4.52 writes
    `model.language_model.*`, older versions `language_model.model.*`."""
    if any(k.startswith("model.language_model.") for k in TensorStore(folder).keys()):
        return dict(llm_prefix="model.language_model.", vision_prefix="model.vision_tower.",
                    projector_prefix="model.multi_modal_projector.")
    return dict(llm_prefix="language_model.model.", head_prefix="language_model.",
                vision_prefix="vision_tower.", projector_prefix="multi_modal_projector.")


def _llava_layout(folder: Path, top: dict) -> CheckpointLayout:
    """transformers >= 4.52 writes `model.language_model.*`, older versions `language_model.model.*`."""
    llm = _llm_config(top["text_config"])
    prefixes = _hf_vlm_prefixes(folder)
    return CheckpointLayout("llava", folder, top, folder, top["text_config"], folder / "config.json", llm,
                            vision_dir=folder, projector_dir=folder, **prefixes)


def _internvl_llm_config(d: dict) -> dict:
    """InternVL / NVLM-D's `llm_config` as our LLMConfig reads it. NVLM-D writes its Qwen2 as
    model_type "llama" (architectures say Qwen2ForCausalLM) with a dynamic rope_scaling that the
    transformers Qwen2 it was run with never applied: it is read as the Qwen2 it is."""
    d = dict(d)
    if (d.get("architectures") or [None])[0] == "Qwen2ForCausalLM" and d.get("model_type") != "qwen2":
        d["model_type"] = "qwen2"
        d.pop("rope_scaling", None)
    return d


def _internvl_layout(folder: Path, top: dict) -> CheckpointLayout:
    hf = top["model_type"] == "internvl"
    if hf:  # as transformers writes it (and the Hub's -hf repos), or with its in-memory "model." names
        llm_top = top["text_config"]
        prefixes = _hf_vlm_prefixes(folder)
    else:
        if "llm_config" not in top or "vision_config" not in top:
            raise CheckpointError(f"{folder}/config.json lacks llm_config or vision_config")
        llm_top = _internvl_llm_config(top["llm_config"])
        prefixes = dict(llm_prefix="language_model.model.", head_prefix="language_model.",
                        vision_prefix="vision_model.", projector_prefix="mlp1.")
    llm = _llm_config(llm_top)
    if not llm.tie_word_embeddings and prefixes.get("head_prefix", "") + "lm_head.weight" not in TensorStore(folder):
        llm.tie_word_embeddings = True  # -hf folders of tied models (InternVL3-1B) store no lm_head
    return CheckpointLayout("internvl", folder, top, folder, llm_top, folder / "config.json", llm,
                            vision_dir=folder, projector_dir=folder, **prefixes)


