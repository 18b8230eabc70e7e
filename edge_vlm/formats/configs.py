"""Model configuration: the few numbers our model code needs, read from Hugging Face configs.

Each architecture's `config.json` spells things differently (`rope_theta` vs
`rope_parameters`, `norm_eps` vs `rms_norm_eps`, ...); this module is the one place that
knows those spellings, so the model code only sees plain dataclasses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from ..errors import UnsupportedModelError

SUPPORTED_LLMS = ("llama", "qwen2", "nemotron")
SUPPORTED_VISION = ("siglip_vision_model", "clip_vision_model", "intern_vit_6b", "internvl_vision")
VILA_DOWNSAMPLE_PROJECTORS = ("mlp_downsample", "mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix",
                              "mlp_downsample_3x3_s2", "mlp_downsample_3x3_s2_new")
SUPPORTED_PROJECTORS = ("linear", "mlpNx_gelu") + VILA_DOWNSAMPLE_PROJECTORS + ("mlp1",)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # InternVL's normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LLMConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0
    qkv_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    @property
    def norm(self) -> str:
        """`rms` for Llama/Qwen2, `layernorm1p` (LayerNorm with weight+1) for Nemotron."""
        return "layernorm1p" if self.arch == "nemotron" else "rms"

    @property
    def mlp(self) -> str:
        """`gated_silu` (gate/up/down) or `relu2` (Nemotron's up/down with squared ReLU)."""
        return "relu2" if self.arch == "nemotron" else "gated_silu"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, d: dict) -> "LLMConfig":
        arch = d.get("model_type")
        if arch not in SUPPORTED_LLMS:
            raise UnsupportedModelError(
                f"unsupported language model type {arch!r}; supported: {', '.join(SUPPORTED_LLMS)}"
            )
        rope = dict(d.get("rope_parameters") or {})
        scaling = d.get("rope_scaling") or None
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = rope
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise UnsupportedModelError(f"unsupported RoPE scaling {kind!r}; supported: linear, llama3")
            scaling = None if kind == "default" else {**scaling, "rope_type": kind}
        heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        default_partial = 0.5 if arch == "nemotron" else 1.0
        partial = d.get("partial_rotary_factor", rope.get("partial_rotary_factor", default_partial))
        if arch == "llama" and d.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"unsupported activation {d.get('hidden_act')!r} for llama")
        return cls(
            arch=arch,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or hidden // heads,
            norm_eps=d.get("norm_eps", d.get("rms_norm_eps", d.get("layer_norm_eps", 1e-5))),
            rope_theta=float(d.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling=scaling,
            partial_rotary_factor=float(partial),
            qkv_bias=arch == "qwen2" or bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


@dataclass
class VisionConfig:
    arch: str  # "siglip" or "clip"
    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    hidden_act: str
    select_layer: int = -2
    drop_cls: bool = False  # "patch" / LLaVA "default": drop the first token (CLIP's CLS)
    # InternViT switches (arch "internvit"): 300M is LayerNorm without q/k norm, 6B RMSNorm with
    # q/k RMSNorm over all heads; both scale each residual branch by a learned vector (ls1, ls2).
    norm: str = "layer_norm"  # or "rms_norm"
    qk_norm: bool = False
    qkv_bias: bool = True

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_used(self) -> int:
        """How many encoder layers feed the selected hidden state (hidden_states[0] is the embedding)."""
        n = self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer
        if not 0 <= n <= self.num_layers:
            raise UnsupportedModelError(f"vision select layer {self.select_layer} out of range")
        return n

    @classmethod
    def from_hf(cls, d: dict, select_layer: int = -2, select_feature: str = "patch") -> "VisionConfig":
        kind = d.get("model_type")
        if kind not in SUPPORTED_VISION:
            raise UnsupportedModelError(
                f"unsupported vision tower {kind!r}; supported: {', '.join(SUPPORTED_VISION)}"
            )
        arch = "siglip" if kind.startswith("siglip") else "clip"
        return cls(
            arch=arch,
            image_size=d["image_size"],
            patch_size=d["patch_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            layer_norm_eps=d.get("layer_norm_eps", 1e-5 if arch == "clip" else 1e-6),
            hidden_act=d.get("hidden_act", "quick_gelu" if arch == "clip" else "gelu_pytorch_tanh"),
            select_layer=select_layer,
            drop_cls=select_feature in ("patch", "default"),
        )

    @classmethod
    def from_internvit(cls, d: dict, select_layer: int = -1) -> "VisionConfig":
        """InternViT's own config (`intern_vit_6b`, NVLM-D and InternVL repos) or transformers'
        `internvl_vision` (the -hf repos); both read the patches after the CLS token."""
        kind = d.get("model_type")
        if kind not in ("intern_vit_6b", "internvl_vision"):
            raise UnsupportedModelError(f"unsupported InternVL vision tower {kind!r}")
        side = lambda v: v[0] if isinstance(v, (list, tuple)) else v  # noqa: E731
        hf = kind == "internvl_vision"
        if hf and not d.get("use_mean_pooling", True) and select_layer == -1:
            raise UnsupportedModelError("InternVL towers with a final LayerNorm (use_mean_pooling false) "
                                        "are not supported")
        return cls(
            arch="internvit", image_size=side(d.get("image_size", 448)), patch_size=side(d.get("patch_size", 14)),
            hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
            layer_norm_eps=d.get("layer_norm_eps", 1e-6), hidden_act=d.get("hidden_act", "gelu"),
            select_layer=select_layer, drop_cls=True, norm=d.get("norm_type", "layer_norm"),
            qk_norm=bool(d.get("use_qk_norm" if hf else "qk_normalization", False)),
            qkv_bias=bool(d.get("attention_bias" if hf else "qkv_bias", True)),
        )

    @classmethod
    def from_vila(cls, top: dict, tower: dict) -> "VisionConfig":
        """From a VILA top config.json and its vision_tower/config.json."""
        aspect, dynamic_s2, fixed_s2 = top.get("image_aspect_ratio"), top.get("dynamic_s2"), top.get("s2")
        if aspect == "dynamic" and (dynamic_s2 or fixed_s2):
            raise UnsupportedModelError("VILA image_aspect_ratio 'dynamic' together with S2 is not supported; "
                                        "supported: dynamic tiling without S2 (NVILA-Lite) or dynamic_s2 (NVILA)")
        if aspect == "dynamic_s2" and not dynamic_s2:
            raise UnsupportedModelError("image_aspect_ratio 'dynamic_s2' needs dynamic_s2 true in config.json")
        if top.get("ps3"):
            raise UnsupportedModelError("VILA checkpoints with PS3 high-resolution selection are not supported")
        return cls.from_hf(tower, select_layer=top.get("mm_vision_select_layer", -2),
                           select_feature=top.get("mm_vision_select_feature", "cls_patch"))

    @classmethod
    def from_llava(cls, top: dict) -> "VisionConfig":
        """From a transformers LLaVA config.json (vision_config + the feature selection fields)."""
        strategy = top.get("vision_feature_select_strategy", "default")
        layer = top.get("vision_feature_layer", -2)
        if isinstance(layer, list):
            raise UnsupportedModelError("LLaVA checkpoints that concatenate several vision layers are not supported")
        return cls.from_hf(top["vision_config"], select_layer=layer,
                           select_feature="default" if strategy == "default" else "full")


@dataclass
class ProjectorConfig:
    """A projector's kind and widths. `kind` is VILA's `mm_projector_type` (or InternVL's `mlp1`).

    The downsampling kinds first merge each k x k block of patches into one token (k = `merge_factor`),
    then LayerNorm, then Linears with GELU between them; the 3x3 kinds also put a LayerNorm after every
    GELU but the last (`inner_norms`). Widths of the Linears' outputs: `linear_dims`.
    """

    kind: str  # "linear", "mlp2x_gelu", ..., "mlp_downsample", "mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix",
    #            "mlp_downsample_3x3_s2", "mlp_downsample_3x3_s2_new" or "mlp1" (InternVL)
    in_dim: int
    out_dim: int
    # mlp1 only: width of the middle layer (InternVL: the LLM's hidden size, NVLM-D: its
    # intermediate size), whether its Linears have biases (NVLM-D: no), the pixel-shuffle ratio
    mid_dim: int | None = None
    bias: bool = True
    downsample_ratio: float = 0.5

    @property
    def merge(self) -> str:
        """How patches become tokens: "none", "2x2_columns" (VILA1.5's mlp_downsample: column blocks
        outermost), "2x2_rows" / "3x3_rows" (NVILA's: row blocks outermost) or "pixel_shuffle" (InternVL)."""
        if self.kind == "mlp_downsample":
            return "2x2_columns"
        if self.kind == "mlp_downsample_2x2_fix":
            return "2x2_rows"
        if self.kind.startswith("mlp_downsample_3x3"):
            return "3x3_rows"
        return "pixel_shuffle" if self.kind == "mlp1" else "none"

    @property
    def merge_factor(self) -> int:
        """Side of the block of patches merged into one token (1: no merge)."""
        return {"none": 1, "3x3_rows": 3}.get(self.merge, 2)

    @property
    def inner_norms(self) -> bool:
        """A LayerNorm after each GELU except the last one (VILA's 3x3 projectors)."""
        return self.merge == "3x3_rows"

    @property
    def linear_dims(self) -> list[int]:
        """Output width of each Linear, in order."""
        m, h = self.in_dim, self.out_dim
        if self.kind == "mlp_downsample_3x3_fix":
            return [3 * m, h, h]
        if self.kind == "mlp_downsample_3x3_s2":
            return [3 * m, m, m // 3, h, h]
        if self.kind == "mlp_downsample_3x3_s2_new":
            return [4 * m, 2 * m, m, m // 3, h, h]
        if self.kind == "mlp1" and self.mid_dim:
            return [self.mid_dim, h]
        return [h] * self.depth

    @property
    def depth(self) -> int:
        """How many Linears."""
        if self.kind == "linear":
            return 1
        if self.kind in ("mlp_downsample", "mlp_downsample_2x2_fix", "mlp1"):
            return 2
        if self.kind.startswith("mlp_downsample_3x3"):
            return len(self.linear_dims)
        return int(self.kind[3:-6])  # "mlp{N}x_gelu"

    @classmethod
    def from_vila(cls, top: dict, projector: dict, vision_hidden: int, llm_hidden: int) -> "ProjectorConfig":
        """From a VILA top config.json and its mm_projector/config.json.

        `mlp_downsample` changed its token order in VILA's NVILA release (Dec 2024): VILA1.5 was trained
        with column blocks outermost, NVILA with row blocks outermost (the same module as
        `mlp_downsample_2x2_fix`). A config written by the NVILA-era code has the keys that code added
        (`dynamic_s2`, `image_encoder`, `video_encoder`); VILA1.5's have none of them.
        """
        kind = projector.get("mm_projector_type", top.get("mm_projector_type", "linear"))
        if kind == "mlp_downsample" and any(k in top for k in ("dynamic_s2", "image_encoder", "video_encoder")):
            kind = "mlp_downsample_2x2_fix"
        return cls(kind, top.get("mm_hidden_size", vision_hidden), llm_hidden)

    @classmethod
    def from_llava(cls, top: dict, vision_hidden: int, llm_hidden: int) -> "ProjectorConfig":
        """transformers' LLaVA projector is always Linear, GELU, Linear."""
        act = top.get("projector_hidden_act", "gelu")
        if act != "gelu":
            raise UnsupportedModelError(f"unsupported projector activation {act!r}")
        return cls("mlp2x_gelu", vision_hidden, llm_hidden)

    def validate(self) -> None:
        if self.kind == "mlp1" and self.downsample_ratio != 0.5:
            raise UnsupportedModelError(f"unsupported InternVL downsample ratio {self.downsample_ratio}; supported: 0.5")
        if self.kind not in VILA_DOWNSAMPLE_PROJECTORS + ("linear", "mlp1") and not re.fullmatch(r"mlp\d+x_gelu",
                                                                                              self.kind):
            raise UnsupportedModelError(
                f"unsupported projector {self.kind!r}; supported: {', '.join(SUPPORTED_PROJECTORS)}")
        if self.kind.startswith("mlp_downsample_3x3_s2") and self.in_dim % 3:
            raise UnsupportedModelError(f"projector {self.kind!r} needs a vision width divisible by 3, "
                                        f"not {self.in_dim}")


@dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's `quantization_config` (AutoAWQ GEMM, TinyChat's `w_bit`/`q_group_size`, our extensions)."""

    bits: int = 4
    group_size: int = 128
    modules_to_not_convert: tuple[str, ...] = ()
    quantize_lm_head: bool = False  # edge-vlm extension: int4 lm_head (large vocabularies)
    quantize_embedding: bool = False  # edge-vlm extension: int8 token embeddings
    method: str = "awq"

    @classmethod
    def from_hf(cls, d: dict | None) -> "QuantConfig | None":
        """None for an unquantized checkpoint; raises UnsupportedModelError for what we cannot run."""
        if not d:
            return None
        method = str(d.get("quant_method", "awq")).lower()
        if method != "awq":
            raise UnsupportedModelError(f"unsupported quantization method {method!r}; supported: awq")
        version = str(d.get("version", "gemm")).lower()
        if version != "gemm":
            raise UnsupportedModelError(f"unsupported AWQ layout {version!r}; supported: gemm")
        if d.get("zero_point", True) is False:
            raise UnsupportedModelError("AWQ checkpoints without zero points are not supported")
        return cls(bits=int(d.get("bits", d.get("w_bit", 4))),
                   group_size=int(d.get("group_size", d.get("q_group_size", 128))),
                   modules_to_not_convert=tuple(d.get("modules_to_not_convert") or ()),
                   quantize_lm_head=bool(d.get("quantize_lm_head")),
                   quantize_embedding=bool(d.get("quantize_embedding")), method=method)

    @staticmethod
    def section_of(config: dict) -> dict | None:
        """The `quantization_config` block of a model config.json as written (None: not quantized)."""
        return config.get("quantization_config") or None

    def to_hf(self) -> dict:
        """The `quantization_config` block we write: AutoAWQ GEMM, plus our extensions only when used."""
        conf = {"quant_method": self.method, "bits": self.bits, "group_size": self.group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": list(self.modules_to_not_convert)}
        if self.quantize_lm_head:
            conf["quantize_lm_head"] = True  # AutoAWQ readers keep lm_head 16-bit
        if self.quantize_embedding:
            conf["quantize_embedding"] = True  # int8 embed_tokens.{qweight,scales}
        return conf

    @staticmethod
    def group_size_of(d: dict | None) -> int | None:
        """The group size a config names, if any (TinyChat checkpoints infer it otherwise)."""
        d = d or {}
        value = d.get("group_size") or d.get("q_group_size")
        return int(value) if value else None

    def describe(self) -> str:
        return f"{self.method} w{self.bits} g{self.group_size}"


@dataclass(frozen=True)
class ImageConfig:
    """How one picture becomes the tower's square pixel tensor: the steps of the Hugging Face image
    processors, in their order (image_processor_config.py reads them from a checkpoint).

    1. `pad_to_square`: pad to a square with the mean colour (LLaVA / VILA "pad", `do_pad`);
    2. `squash_first`: squash to this square first (VILA's "resize" aspect ratio), PIL bicubic;
    3. resize: "square" squashes to `resize_to` x `resize_to`, "shortest_edge" scales the short side
       to `resize_to` (the long side truncated, as transformers does);
    4. `crop`: centre-crop to `size` (zero-padded where the picture is smaller);
    5. rescale by `rescale_factor`, normalise with `mean` / `std`.
    """

    size: int  # the square side fed to the tower
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "square"  # or "shortest_edge"
    resize_to: int | None = None  # None: `size`
    crop: bool = False
    pad_to_square: bool = False
    squash_first: int | None = None
    resample: int = 3  # PIL bicubic
    rescale_factor: float = 1 / 255

    def __post_init__(self):
        if self.resize not in ("square", "shortest_edge"):
            raise UnsupportedModelError(f"unsupported image resize {self.resize!r}; supported: square, shortest_edge")
        if self.resize_to is None:
            object.__setattr__(self, "resize_to", self.size)
        if not self.crop and (self.resize != "square" or self.resize_to != self.size):
            raise UnsupportedModelError(f"image preparation without a centre crop must squash to the tower's "
                                        f"{self.size} px, not {self.resize} {self.resize_to}")

    def with_squash_first(self) -> "ImageConfig":
        return replace(self, squash_first=self.size)

    def with_pad_to_square(self) -> "ImageConfig":
        return replace(self, pad_to_square=True)

    def at_side(self, side: int) -> "ImageConfig":
        """The same steps ending at `side` px: S2 models prepare pictures at the scale they are cut from
        (dynamic S2: the tile; fixed S2: the largest scale), and their tower graph takes `side`-px tiles."""
        return replace(self, size=side, resize_to=side, squash_first=side if self.squash_first else None)

    def describe(self) -> str:
        """One readable line: the steps, the mean and std."""
        steps = ["pad to a square with the mean colour"] if self.pad_to_square else []
        if self.squash_first:
            steps.append(f"squash to {self.squash_first} px")
        steps.append(f"resize the short side to {self.resize_to} px" if self.resize == "shortest_edge"
                     else f"squash to {self.resize_to} px")
        if self.crop:
            steps.append(f"centre-crop {self.size} px")
        fmt = lambda v: "/".join(f"{x:.3g}" for x in v)  # noqa: E731
        resample = {0: "nearest", 2: "bilinear", 3: "bicubic", 1: "lanczos"}.get(self.resample, str(self.resample))
        return f"{', '.join(steps)} ({resample}), mean {fmt(self.mean)}, std {fmt(self.std)}"


@dataclass(frozen=True)
class TilingConfig:
    """Dynamic tiling (InternVL, NVLM-D; imaging/tiling.py cuts the tiles): tile side, tiles a picture may take."""

    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12  # InternVL's default; NVLM-D's config says 6
    thumbnail: bool = True

    def with_max_tiles(self, max_tiles: int) -> "TilingConfig":
        if max_tiles < 1:
            raise ValueError(f"max tiles must be at least 1, not {max_tiles}")
        return TilingConfig(self.tile_size, min(self.min_tiles, max_tiles), max_tiles, self.thumbnail)
