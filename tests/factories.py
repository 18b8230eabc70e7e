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


LAYOUTS = ("hub", "processor")  # where the image processor's settings are saved (see save_image_processor)


def image_processor(kind: str, image_size: int, **over):
    """transformers' own image processor of a tower (PIL backend: no torchvision here), at its size."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    if kind == "siglip":
        return SiglipImageProcessorPil(size={"height": image_size, "width": image_size}, **over)
    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size}, **over)


def save_image_processor(folder: Path, processor, layout: str, wrap=None, **wrap_kwargs) -> None:
    """Save an image processor in one of the layouts transformers writes, wrapped in the processor
    class `wrap` (default SiglipProcessor) with the folder's tokenizer:
    - "processor": the wrapper's save_pretrained, which in transformers >= 5 nests the image
      processor in processor_config.json (and writes no preprocessor_config.json);
    - "hub": the Hub's older layout: the image processor's own save_pretrained
      (preprocessor_config.json) beside a processor_config.json of the wrapper's attributes only."""
    from transformers import AutoTokenizer, SiglipProcessor

    tok_dir = folder if (folder / "tokenizer.json").is_file() else folder.parent / "llm"
    wrapper = (wrap or SiglipProcessor)(image_processor=processor, tokenizer=AutoTokenizer.from_pretrained(tok_dir),
                                        **wrap_kwargs)
    if layout == "processor":
        wrapper.save_pretrained(folder)
        assert not (folder / "preprocessor_config.json").exists()
    elif layout == "hub":
        processor.save_pretrained(folder)
        attributes = {k: v for k, v in wrapper.to_dict().items() if k != "image_processor"}
        (folder / "processor_config.json").write_text(json.dumps(attributes, indent=2))
    else:
        raise ValueError(layout)


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
              vision_kind: str = "siglip", seed: int = 0, llm_folder: Path | None = None, layout: str = "hub",
              aspect: str | None = "resize", **vision_over):
    """A VILA-layout folder: config.json (llava_llama) + llm/ + vision_tower/ + mm_projector/.

    `llm_folder` copies an existing HF LLM folder (e.g. real SmolLM2) instead of a tiny random one.
    `layout`: where vision_tower/ keeps the image processor (save_image_processor; "none": nowhere).
    `aspect`: the config's image_aspect_ratio (None: the key is absent).
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
    if layout != "none":
        save_image_processor(folder / "vision_tower", image_processor(vision_kind, vcfg.image_size), layout)
    proj = vila_projector(projector, vcfg.hidden_size, hidden, seed)
    (folder / "mm_projector").mkdir(parents=True)
    save_file({f"layers.{k}": v.contiguous() for k, v in proj.state_dict().items()},
              str(folder / "mm_projector" / "model.safetensors"))
    (folder / "mm_projector" / "config.json").write_text(json.dumps(
        {"architectures": ["MultimodalProjector"], "mm_projector_type": projector, "model_type": "v2l_projector"}))
    llm_cfg = json.loads((folder / "llm" / "config.json").read_text())
    top = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "hidden_size": hidden,
           "mm_hidden_size": vcfg.hidden_size, "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "cls_patch", **({"image_aspect_ratio": aspect} if aspect else {}),
           "llm_cfg": llm_cfg, "vision_tower_cfg": vcfg.to_dict(),
           "mm_projector_cfg": {"mm_projector_type": projector, "model_type": "v2l_projector"},
           "num_video_frames": 8}
    (folder / "config.json").write_text(json.dumps(top))
    return llm, vision, proj


def make_rtn_int4(source: Path, out: Path, group_size: int) -> Path:
    """`source` quantized to an int4 (AWQ GEMM layout) folder at `out` by round-to-nearest: no
    calibration, so it takes seconds; quietly (no progress bar, no log)."""
    from edge_vlm.quantize.pipeline import QuantizeSettings, quantize_checkpoint

    quantize_checkpoint(source, out, QuantizeSettings(method="rtn", group_size=group_size), progress=False,
                        log=lambda _msg: None)
    return out


def make_llava(folder: Path, text_kind: str = "nemotron", vision_kind: str = "clip", seed: int = 0,
               image_size: int = 28, layout: str = "hub", **text_over):
    """A transformers LlavaForConditionalGeneration folder (the Nemovision-style single folder); its
    image processor saved by transformers in `layout` (save_image_processor; "none": not at all)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = llm_config(text_kind, **text_over)
    vis = vision_config(vision_kind, image_size=image_size)
    strategy = "default" if vision_kind == "clip" else "full"  # llava-hf SigLIP models keep every patch
    # the image token: one no prompt holds (byte-level BPE never yields <unk>; transformers counts them)
    cfg = LlavaConfig(vision_config=vis.to_dict(), text_config=text.to_dict(),
                      image_token_index=SPECIAL_TOKENS.index("<unk>"),
                      vision_feature_layer=-2, vision_feature_select_strategy=strategy)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    _randomize(model, seed)
    folder = Path(folder)
    model.save_pretrained(folder)
    train_tokenizer(folder)
    if layout != "none":
        from transformers import LlavaProcessor

        save_image_processor(folder, image_processor(vision_kind, image_size), layout, LlavaProcessor,
                             patch_size=vis.patch_size, vision_feature_select_strategy=strategy)
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


# ---------------------------------------------------------------- InternVL / NVLM-D

INTERNVL_SPECIALS = ["<img>", "</img>", "<IMG_CONTEXT>", "<|vision_pad|>"]


def train_internvl_tokenizer(folder: Path) -> None:
    """The tiny byte-level BPE of `train_tokenizer`, plus InternVL's image tokens (`<img>`, `</img>`,
    `<IMG_CONTEXT>`) and NVLM-D's context token (Qwen2's `<|vision_pad|>`) as special tokens. NVLM-D's
    tile tags and `<Image>` stay plain text, so prompt chunk boundaries are exercised."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS + INTERNVL_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS + " <tile_1> <tile_global_thumbnail> <Image></Image>"] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    # InternVLProcessor reads its image tokens from the tokenizer (transformers' -hf tokenizers carry them)
    cfg = {"bos_token": None, "eos_token": "<|im_end|>", "unk_token": "<unk>", "model_max_length": 512,
           "tokenizer_class": "PreTrainedTokenizerFast",
           "extra_special_tokens": {"start_image_token": "<img>", "end_image_token": "</img>",
                                    "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def internvl_image_processor(image_size: int, max_patches: int):
    """GotOcr2's image processor as transformers' conversion script writes it for the -hf repos:
    ImageNet mean/std at the tile size, `crop_to_patches` left at its class default (false)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, max_patches=max_patches,
                                    image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


class _WithoutVideo:
    """InternVLProcessor with no video processor: its class needs torchvision, which does not install
    beside the CPU torch here. Images go through the real InternVLProcessor code (call-time defaults
    included); only the video attribute is left out, for as long as the context lasts."""

    def __enter__(self):
        from transformers import InternVLProcessor

        self.cls, self.saved = InternVLProcessor, InternVLProcessor.__dict__.get("get_attributes")
        InternVLProcessor.get_attributes = classmethod(lambda cls: ["image_processor", "tokenizer"])
        return InternVLProcessor

    def __exit__(self, *exc):
        if self.saved is None:
            del self.cls.get_attributes
        else:
            self.cls.get_attributes = self.saved


def internvl_processor(folder: Path):
    """transformers' InternVLProcessor for an -hf folder, its image processor found by transformers'
    own loader (processor_config.json's nested block first, then preprocessor_config.json)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    seq = json.loads((Path(folder) / "config.json").read_text())["image_seq_length"]
    with _WithoutVideo() as cls:
        return cls(image_processor=AutoImageProcessor.from_pretrained(folder),
                   tokenizer=AutoTokenizer.from_pretrained(folder), image_seq_length=seq)


def make_internvl_hf(folder: Path, norm: str = "layer_norm", qk_norm: bool = False, seed: int = 0,
                     image_size: int = 56, max_patches: int = 6, layers: int = 2, projector_bias: bool = True,
                     layout: str = "hub", **text_over):
    """A transformers InternVLForConditionalGeneration `-hf` folder (InternViT + Qwen2), tiny and random.
    300M style: norm="layer_norm", qk_norm=False (q/k/v biases); 6B style: "rms_norm", qk_norm=True, no
    q/k/v biases. `projector_bias=False` zeroes the projector's biases (to match NVLM-D's bias-free mlp1).
    `layout`: the image processor saved alone ("hub": preprocessor_config.json, as the -hf repos ship it)
    or inside InternVLProcessor's processor_config.json ("processor", transformers >= 5)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

    folder = Path(folder)
    train_internvl_tokenizer(folder)
    from tokenizers import Tokenizer

    context_id = Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("<IMG_CONTEXT>")
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                  num_attention_heads=4, image_size=image_size, patch_size=14, norm_type=norm,
                                  use_qk_norm=qk_norm, attention_bias=not qk_norm)
    text = llm_config("qwen2", eos_token_id=4, **text_over)  # eos: <|im_end|>
    cfg = InternVLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=context_id,
                         image_seq_length=(image_size // 14) ** 2 // 4, downsample_ratio=0.5,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg).eval()
    _randomize(model, seed)
    if not projector_bias:
        with torch.no_grad():
            for name, p in model.model.multi_modal_projector.named_parameters():
                if name.startswith("linear") and name.endswith("bias"):
                    p.zero_()
    model.save_pretrained(folder)
    if layout != "none":
        with _WithoutVideo() as cls:
            save_image_processor(folder, internvl_image_processor(image_size, max_patches), layout, cls,
                                 image_seq_length=cfg.image_seq_length)
    return model


def write_internvl_original(folder: Path, hf_model, tokenizer_from: Path, style: str = "internvl",
                            dummy_heads: int = 0, max_tiles: int = 6) -> None:
    """Write a native InternVL model's weights in InternVL's original layout (`internvl_chat`) or
    NVLM-D's (`NVLM_D`: bias-free mlp1 of the LLM's intermediate width, its Qwen2 written as model_type
    llama, and `dummy_heads` zero padding heads in every attention, as NVLM-D's 6B tower has)."""
    import shutil

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    src = Path(tokenizer_from)
    cfg = hf_model.config
    v = cfg.vision_config
    d, heads = v.hidden_size, v.num_attention_heads
    hd = d // heads
    pad = dummy_heads * hd
    sd = {k: t.detach().clone() for k, t in hf_model.state_dict().items()}
    out = {}

    def padded_rows(w):  # [d, ...] -> [d + pad, ...], the padding heads zero
        return torch.cat([w, torch.zeros(pad, *w.shape[1:], dtype=w.dtype)])

    vp, op = "model.vision_tower.", "vision_model."
    out[op + "embeddings.class_embedding"] = sd[vp + "embeddings.cls_token"]
    out[op + "embeddings.position_embedding"] = sd[vp + "embeddings.position_embeddings"]
    for what in ("weight", "bias"):
        out[op + f"embeddings.patch_embedding.{what}"] = sd[vp + f"embeddings.patch_embeddings.projection.{what}"]
    for i in range(v.num_hidden_layers):
        a, b = f"{vp}encoder.layer.{i}.", f"{op}encoder.layers.{i}."
        out[b + "attn.qkv.weight"] = torch.cat([padded_rows(sd[a + f"attention.{x}_proj.weight"]) for x in "qkv"])
        if a + "attention.q_proj.bias" in sd:
            out[b + "attn.qkv.bias"] = torch.cat([padded_rows(sd[a + f"attention.{x}_proj.bias"]) for x in "qkv"])
        proj = sd[a + "attention.projection_layer.weight"]
        out[b + "attn.proj.weight"] = torch.cat([proj, torch.full((d, pad), 0.5)], 1)  # dead: v rows are zero
        out[b + "attn.proj.bias"] = sd[a + "attention.projection_layer.bias"]
        for x in ("q", "k"):
            if a + f"attention.{x}_norm.weight" in sd:
                out[b + f"attn.{x}_norm.weight"] = torch.cat([sd[a + f"attention.{x}_norm.weight"], torch.ones(pad)])
        for ours, theirs in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for what in ("weight", "bias"):
                if f"{a}{theirs}.{what}" in sd:
                    out[f"{b}{ours}.{what}"] = sd[f"{a}{theirs}.{what}"]
        out[b + "ls1"], out[b + "ls2"] = sd[a + "lambda_1"], sd[a + "lambda_2"]
    pp = "model.multi_modal_projector."
    for n, theirs in (("0", "layer_norm"), ("1", "linear_1"), ("3", "linear_2")):
        out[f"mlp1.{n}.weight"] = sd[f"{pp}{theirs}.weight"]
        if style == "internvl" or n == "0":
            out[f"mlp1.{n}.bias"] = sd[f"{pp}{theirs}.bias"]
    for k, t in sd.items():
        if k.startswith("model.language_model."):
            out["language_model.model." + k[len("model.language_model."):]] = t
    out["language_model.lm_head.weight"] = sd["lm_head.weight"]
    save_file({k: t.contiguous() for k, t in out.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    llm = cfg.text_config.to_dict()
    llm["architectures"] = ["Qwen2ForCausalLM"]
    if style == "nvlm":
        llm.update(model_type="llama", attention_bias=True, rope_scaling={"factor": 3.0, "type": "dynamic"})
    vis = {"model_type": "intern_vit_6b", "architectures": ["InternVisionModel"], "hidden_size": d,
           "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
           "num_attention_heads": heads, "image_size": v.image_size[0], "patch_size": v.patch_size[0],
           "qkv_bias": v.attention_bias, "qk_normalization": v.use_qk_norm, "norm_type": v.norm_type,
           "layer_norm_eps": v.layer_norm_eps, "hidden_act": "gelu"}
    top = {"architectures": ["NVLM_D" if style == "nvlm" else "InternVLChatModel"],
           "model_type": "NVLM_D" if style == "nvlm" else "internvl_chat", "llm_config": llm, "vision_config": vis,
           "select_layer": -1, "downsample_ratio": 0.5, "ps_version": "v2", "force_image_size": v.image_size[0],
           "dynamic_image_size": True, "min_dynamic_patch": 1, "max_dynamic_patch": max_tiles, "use_thumbnail": True,
           "template": "chatml" if style == "nvlm" else "internvl2_5"}
    (folder / "config.json").write_text(json.dumps(top))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, folder / f)
