"""Tiny random-weight checkpoints of the real architectures, saved in the real layouts.

Built with transformers' own classes (a test-only dependency) so our loader is exercised on
exactly the files and key names those classes write. A small byte-level BPE tokenizer is
trained on the fly so chat templates and streaming run on real tokenization.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<extra_id_0>", "<extra_id_1>",
                  "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: ASSISTANT: System User Assistant "
    "What is in this picture? Describe the image. A cat sits on a red sofa next to a window. "
    "The quick brown fox jumps over the lazy dog. Where is the person? Is there a car? yes no "
    "Über café naïve 東京 🙂 — numbers 0123456789 and punctuation !?.,;:'\"()[]{}<>/\\|@#$%^&*+=-_\n"
)
VOCAB = 384


def train_tokenizer(folder: Path, vocab_size: int = VOCAB, chat_template: str | None = None) -> None:
    """Write tokenizer.json + tokenizer_config.json (byte-level BPE, specials as added tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 512,
           "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def llm_config(kind: str, **over):
    """A tiny transformers config of `kind` (llama, qwen2, nemotron)."""
    from transformers import LlamaConfig, NemotronConfig, Qwen2Config

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    base.update(over)
    if kind == "llama":
        return LlamaConfig(rms_norm_eps=1e-5, **base)
    if kind == "qwen2":
        return Qwen2Config(rms_norm_eps=1e-6, **base)
    if kind == "nemotron":
        base.setdefault("partial_rotary_factor", 0.5)
        return NemotronConfig(norm_eps=1e-5, **base)
    raise ValueError(kind)


def _llm_class(kind: str):
    from transformers import LlamaForCausalLM, NemotronForCausalLM, Qwen2ForCausalLM

    return {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "nemotron": NemotronForCausalLM}[kind]


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights with enough spread that logits are far from ties (incl. norms and biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                base = 0.0 if p.abs().sum() == 0 else 1.0  # LayerNorm1P stores a delta from 1
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def make_llm(folder: Path, kind: str = "llama", seed: int = 0, chat_template: str | None = None, **over):
    """Save a tiny random `kind` LLM as a Hugging Face folder; returns the transformers model."""
    torch.manual_seed(seed)
    cfg = llm_config(kind, **over)
    model = _llm_class(kind)(cfg).eval()
    _randomize(model, seed)
    folder = Path(folder)
    model.save_pretrained(folder)
    train_tokenizer(folder, chat_template=chat_template)
    return model


def vision_config(kind: str = "siglip", **over):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    base = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                image_size=42, patch_size=14)
    base.update(over)
    return SiglipVisionConfig(**base) if kind == "siglip" else CLIPVisionConfig(**base)


def make_vision(kind: str = "siglip", seed: int = 0, **over):
    from transformers import CLIPVisionModel, SiglipVisionModel

    cls = SiglipVisionModel if kind == "siglip" else CLIPVisionModel
    model = cls(vision_config(kind, **over)).eval()
    _randomize(model, seed + 1)
    return model


def preprocessor_config(kind: str, image_size: int) -> dict:
    if kind == "siglip":
        return {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
                "size": {"height": image_size, "width": image_size}, "resample": 3, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
            "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size}, "resample": 3,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def vila_projector(kind: str, mm_hidden: int, hidden: int, seed: int = 0) -> torch.nn.Sequential:
    """The projector as VILA builds it (same module indices, hence the same checkpoint keys)."""
    torch.manual_seed(seed + 2)
    nn = torch.nn
    if kind == "mlp_downsample":
        layers = nn.Sequential(nn.Identity(), nn.LayerNorm(mm_hidden * 4), nn.Linear(mm_hidden * 4, hidden),
                               nn.GELU(), nn.Linear(hidden, hidden))
    elif kind == "linear":
        layers = nn.Linear(mm_hidden, hidden)
    else:
        depth = int(kind[3:-6])
        mods = [nn.Linear(mm_hidden, hidden)]
        for _ in range(depth - 1):
            mods += [nn.GELU(), nn.Linear(hidden, hidden)]
        layers = nn.Sequential(*mods)
    with torch.no_grad():
        for p in layers.parameters():
            p.copy_(0.1 * torch.randn(p.shape))
    return layers


def make_vila(folder: Path, llm_kind: str = "llama", projector: str = "mlp_downsample",
              vision_kind: str = "siglip", seed: int = 0, llm_folder: Path | None = None, **vision_over):
    """A VILA-layout folder: config.json (llava_llama) + llm/ + vision_tower/ + mm_projector/.

    `llm_folder` copies an existing HF LLM folder (e.g. real SmolLM2) instead of a tiny random one.
    Returns (llm, vision, projector) reference modules (llm is None when llm_folder is given).
    """
    import shutil

    from safetensors.torch import save_file

    folder = Path(folder)
    if llm_folder is not None:
        shutil.copytree(llm_folder, folder / "llm")
        llm = None
        hidden = json.loads((folder / "llm" / "config.json").read_text())["hidden_size"]
    else:
        llm = make_llm(folder / "llm", llm_kind, seed)
        hidden = llm.config.hidden_size
    vision = make_vision(vision_kind, seed, **vision_over)
    vision.save_pretrained(folder / "vision_tower")
    vcfg = vision.config
    (folder / "vision_tower" / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(vision_kind, vcfg.image_size)))
    proj = vila_projector(projector, vcfg.hidden_size, hidden, seed)
    (folder / "mm_projector").mkdir(parents=True)
    save_file({f"layers.{k}": v.contiguous() for k, v in proj.state_dict().items()},
              str(folder / "mm_projector" / "model.safetensors"))
    (folder / "mm_projector" / "config.json").write_text(json.dumps(
        {"architectures": ["MultimodalProjector"], "mm_projector_type": projector, "model_type": "v2l_projector"}))
    llm_cfg = json.loads((folder / "llm" / "config.json").read_text())
    top = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "hidden_size": hidden,
           "mm_hidden_size": vcfg.hidden_size, "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "cls_patch", "image_aspect_ratio": "resize",
           "llm_cfg": llm_cfg, "vision_tower_cfg": vcfg.to_dict(),
           "mm_projector_cfg": {"mm_projector_type": projector, "model_type": "v2l_projector"},
           "num_video_frames": 8}
    (folder / "config.json").write_text(json.dumps(top))
    return llm, vision, proj


def make_llava(folder: Path, text_kind: str = "nemotron", vision_kind: str = "clip", seed: int = 0,
               image_size: int = 28, **text_over):
    """A transformers LlavaForConditionalGeneration folder (the Nemovision-style single folder)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = llm_config(text_kind, **text_over)
    vis = vision_config(vision_kind, image_size=image_size)
    strategy = "default" if vision_kind == "clip" else "full"  # llava-hf SigLIP models keep every patch
    cfg = LlavaConfig(vision_config=vis.to_dict(), text_config=text.to_dict(), image_token_index=VOCAB - 1,
                      vision_feature_layer=-2, vision_feature_select_strategy=strategy)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    _randomize(model, seed)
    folder = Path(folder)
    model.save_pretrained(folder)
    train_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(vision_kind, image_size)))
    return model


def use_older_llava_key_names(folder: Path) -> None:
    """Rename a make_llava folder's keys as transformers < 4.52 saved them: language_model.model.*,
    language_model.lm_head.*, vision_tower.*, multi_modal_projector.*."""
    from safetensors.torch import load_file, save_file

    def old(key: str) -> str:
        if key.startswith("model.language_model."):
            return "language_model.model." + key[len("model.language_model."):]
        if key.startswith("lm_head."):
            return "language_model." + key
        return key[len("model."):] if key.startswith("model.") else key

    path = Path(folder) / "model.safetensors"
    save_file({old(k): v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
