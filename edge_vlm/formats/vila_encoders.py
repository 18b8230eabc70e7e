"""VILA's own vision settings beyond the tower (NVILA era and VILA1.5-*-s2), read from its top
config.json: S2 multi-scale features (`S2Config`; the tiling arithmetic is imaging/s2_tiling.py,
the feature merging models/s2_features.py) and the media encoders (`ImageEncoderConfig`,
`VideoEncoderConfig`: the text tokens around each image or video and the video pooling, applied
in models/media_encoders.py).

A checkpoint names the media encoders as JSON strings, `image_encoder` and `video_encoder`
(`{"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1, 1]]}`); absent, VILA uses
BasicImageEncoder / BasicVideoEncoder with no start tokens and "\\n" as end tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from ..errors import UnsupportedModelError

MAX_TILES_LIMIT = 64  # bounds the candidate search (cubic in max_tiles) and the tower's work per image


@dataclass(frozen=True)
class S2Config:
    """A VILA checkpoint's S2 settings (`s2_scales`, `s2_max_split_size`, `s2_resize_output_to_scale_idx`,
    `max_tiles`), for either kind."""

    scales: tuple[int, ...]  # ascending, e.g. (448, 896, 1344)
    dynamic: bool  # dynamic S2 (NVILA) or fixed S2 (VILA1.5-*-s2)
    max_split_size: int | None = None  # fixed S2's tile side (the tower's input size)
    resize_output_to_scale_idx: int = 0  # whose feature map size the scales are resized to (Python index)
    max_tiles: int = 12  # dynamic S2: most tiles at the last scale
    tile_single_image: bool = True  # dynamic S2: image_aspect_ratio is dynamic_s2, so a lone image is tiled

    def __post_init__(self):
        self.validate()

    @classmethod
    def from_vila(cls, top: dict) -> "S2Config | None":
        """From a VILA top config.json; None when the checkpoint uses no S2. Dynamic S2 wins over `s2` as in
        VILA's tower builder."""
        dynamic, fixed = bool(top.get("dynamic_s2")), bool(top.get("s2"))
        if not (dynamic or fixed):
            return None
        raw = top.get("s2_scales")
        try:
            scales = tuple(int(s) for s in (raw.split(",") if isinstance(raw, str) else raw))
        except (TypeError, ValueError):
            raise UnsupportedModelError(f"s2_scales {raw!r} is not a list of image sizes (e.g. \"448,896,1344\")")
        if not dynamic:
            scales = tuple(sorted(scales))  # VILA's fixed-S2 tower sorts them; its dynamic tiling does not
        aspect = top.get("image_aspect_ratio")
        if dynamic and aspect not in ("dynamic_s2", "resize", "pad", None):
            raise UnsupportedModelError(f"dynamic_s2 with image_aspect_ratio {aspect!r} is not supported; "
                                        "supported: dynamic_s2, resize, pad")
        split = top.get("s2_max_split_size")
        return cls(scales=scales, dynamic=dynamic, max_split_size=int(split) if split else None,
                   resize_output_to_scale_idx=int(top.get("s2_resize_output_to_scale_idx", 0) or 0),
                   max_tiles=int(top.get("max_tiles", 12) or 12), tile_single_image=aspect == "dynamic_s2")

    def validate(self) -> None:
        n = len(self.scales)
        if n == 0 or any(s <= 0 for s in self.scales) or list(self.scales) != sorted(set(self.scales)):
            raise UnsupportedModelError(f"s2_scales must be ascending positive sizes, not {list(self.scales)}")
        if not -n <= self.resize_output_to_scale_idx < n:
            raise UnsupportedModelError(f"s2_resize_output_to_scale_idx {self.resize_output_to_scale_idx} is not "
                                        f"an index into s2_scales {list(self.scales)}")
        if not self.dynamic and not (self.max_split_size and self.max_split_size > 0):
            raise UnsupportedModelError("fixed S2 needs a positive s2_max_split_size")
        if not 1 <= self.max_tiles <= MAX_TILES_LIMIT:
            raise ValueError(f"max tiles must be between 1 and {MAX_TILES_LIMIT}, not {self.max_tiles}")

    @property
    def tile_size(self) -> int:
        """Dynamic S2's tile side, the image processor's size there (`scales[0]`)."""
        return self.scales[0]

    @property
    def input_size(self) -> int:
        """Fixed S2's image processor size (`scales[-1]`): the image is prepared at the largest scale."""
        return self.scales[-1]

    def describe(self) -> str:
        """One line for `edge-vlm info`."""
        scales = ",".join(map(str, self.scales))
        to = self.scales[self.resize_output_to_scale_idx]
        if not self.dynamic:
            return f"fixed S2, scales {scales} in {self.max_split_size} px tiles, features at the {to} px map"
        tiling = (f"a lone picture tiled {self.tile_size} px a tile at each scale, the last in the aspect grid of "
                  f"{(self.scales[-1] // self.tile_size) ** 2}-{self.max_tiles} tiles" if self.tile_single_image
                  else "every picture one tile")
        return f"dynamic S2, scales {scales}: {tiling}; features at the {to} px map"

    def with_max_tiles(self, max_tiles: int) -> "S2Config":
        """The `--max-tiles` knob: fewer tiles at the last scale, fewer tokens (see `dynamic_s2_image_tokens`)."""
        return replace(self, max_tiles=max_tiles)


MEDIA_TOKENS_DEFAULT = {"start_tokens": None, "end_tokens": "\n"}


def _parse(value, kind: str, targets: dict[str, set[str]]) -> tuple[str, dict]:
    """A VILA encoder setting (JSON string, dict or None) -> (class name, its arguments)."""
    if value is None:
        return next(iter(targets)), {}
    try:
        spec = json.loads(value) if isinstance(value, str) else dict(value)
    except (TypeError, ValueError):
        raise UnsupportedModelError(f"{kind} {value!r} is not a JSON object")
    if not isinstance(spec, dict):
        raise UnsupportedModelError(f"{kind} {value!r} is not a JSON object")
    name = str(spec.pop("_target_", "")).rsplit(".", 1)[-1]
    if name not in targets:
        raise UnsupportedModelError(f"unsupported {kind} {name or value!r}; supported: {', '.join(targets)}")
    extra = sorted(set(spec) - targets[name])
    if extra:
        raise UnsupportedModelError(f"{kind} {name} with {', '.join(extra)} is not supported")
    return name, spec


def _text(value, key: str):
    if value is not None and not isinstance(value, str):
        raise UnsupportedModelError(f"{key} {value!r} is not a string")
    return value


@dataclass(frozen=True)
class ImageEncoderConfig:
    start_tokens: str | None = None
    end_tokens: str | None = "\n"

    @classmethod
    def from_vila(cls, value) -> "ImageEncoderConfig":
        _, args = _parse(value, "image_encoder", {"BasicImageEncoder": {"start_tokens", "end_tokens"}})
        args = {**MEDIA_TOKENS_DEFAULT, **args}
        return cls(_text(args["start_tokens"], "start_tokens"), _text(args["end_tokens"], "end_tokens"))


@dataclass(frozen=True)
class VideoEncoderConfig:
    pool_sizes: tuple[tuple[int, int, int], ...] = ((1, 1, 1),)  # (frames, rows, columns) averaged together
    start_tokens: str | None = None
    end_tokens: str | None = "\n"
    sep_tokens: str | None = None
    frames: int = 8  # frames sampled from a clip unless the user says (the checkpoint's num_video_frames)

    def __post_init__(self):
        if not self.pool_sizes or any(len(p) != 3 or any(not isinstance(v, int) or v < 1 for v in p)
                                      for p in self.pool_sizes):
            raise UnsupportedModelError(f"pool_sizes must be [frames, rows, columns] triples of positive integers, "
                                        f"not {[list(p) for p in self.pool_sizes]}")
        if not isinstance(self.frames, int) or isinstance(self.frames, bool) or not 1 <= self.frames <= 1024:
            raise UnsupportedModelError(f"num_video_frames must be a whole number from 1 to 1024, not {self.frames!r}")

    @classmethod
    def from_vila(cls, value, frames: int = 8) -> "VideoEncoderConfig":
        tokens = {"start_tokens", "end_tokens"}
        name, args = _parse(value, "video_encoder", {"BasicVideoEncoder": tokens,
                                                     "TSPVideoEncoder": tokens | {"pool_sizes", "sep_tokens"}})
        if name == "TSPVideoEncoder" and "pool_sizes" not in args:
            raise UnsupportedModelError("video_encoder TSPVideoEncoder needs pool_sizes")
        args = {**MEDIA_TOKENS_DEFAULT, "sep_tokens": None, "pool_sizes": [[1, 1, 1]], **args}
        try:
            pools = tuple(tuple(p) for p in args["pool_sizes"])
        except TypeError:
            raise UnsupportedModelError(f"pool_sizes {args['pool_sizes']!r} is not a list of triples")
        return cls(pools, _text(args["start_tokens"], "start_tokens"), _text(args["end_tokens"], "end_tokens"),
                   _text(args["sep_tokens"], "sep_tokens"), frames)
