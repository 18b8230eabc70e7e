"""VILA's media encoders (NVILA era): the text-token embeddings around an image's or a video's features,
and the video encoder's pooling over time and space (TSP).

A checkpoint names them in config.json as JSON strings, `image_encoder` and `video_encoder`
(`{"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1, 1]]}`); absent, VILA uses
BasicImageEncoder / BasicVideoEncoder with no start tokens and "\\n" as end tokens.
- Image: [start] + the image's projected tokens + [end].
- Video, BasicVideoEncoder: per frame, in order, [start] + the frame's tokens + [end].
- Video, TSPVideoEncoder: for each pool size (t, h, w) in order: average each run of t consecutive frames
  and each h x w block of the frame's token grid, lay the pooled frames out as BasicVideoEncoder does,
  then [sep]. BasicVideoEncoder is TSP with the one pool size (1, 1, 1) and no sep tokens.
The token strings are the caller's to tokenize and embed (VILA tokenizes them with the LLM's tokenizer).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from ..errors import UnsupportedModelError

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

    def __post_init__(self):
        if not self.pool_sizes or any(len(p) != 3 or any(not isinstance(v, int) or v < 1 for v in p)
                                      for p in self.pool_sizes):
            raise UnsupportedModelError(f"pool_sizes must be [frames, rows, columns] triples of positive integers, "
                                        f"not {[list(p) for p in self.pool_sizes]}")

    @classmethod
    def from_vila(cls, value) -> "VideoEncoderConfig":
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
                   _text(args["sep_tokens"], "sep_tokens"))


def pool_frames(features: torch.Tensor, pool_size: tuple[int, int, int]) -> torch.Tensor:
    """[frames, side*side, C] -> [frames/t, (side/h) * (side/w), C]: means over runs of t frames, h rows and
    w columns of the token grid (in that order, as VILA does)."""
    frames, tokens, c = features.shape
    side = math.isqrt(tokens)
    t, h, w = pool_size
    if side * side != tokens:
        raise ValueError(f"video frames need a square grid of tokens, got {tokens}")
    if frames % t or side % h or side % w:
        raise ValueError(f"pool size {list(pool_size)} does not divide {frames} frames of {side}x{side} tokens")
    x = features.reshape(frames // t, t, side, side, c).mean(1)
    x = x.reshape(frames // t, side // h, h, side, c).mean(2)
    x = x.reshape(frames // t, side // h, side // w, w, c).mean(3)
    return x.reshape(frames // t, (side // h) * (side // w), c)


def _around(features: torch.Tensor, start: torch.Tensor | None, end: torch.Tensor | None) -> torch.Tensor:
    """[frames, tokens, C] -> [frames * (start + tokens + end), C], each frame wrapped."""
    n = features.shape[0]
    parts = ([start.expand(n, -1, -1)] if start is not None else []) + [features] + \
        ([end.expand(n, -1, -1)] if end is not None else [])
    return torch.cat(parts, dim=1).flatten(0, 1)


def encode_video(frame_features: torch.Tensor, cfg: VideoEncoderConfig, start: torch.Tensor | None = None,
                 end: torch.Tensor | None = None, sep: torch.Tensor | None = None) -> torch.Tensor:
    """A video's LLM embeddings [tokens, C] from its frames' projected tokens [frames, side*side, C] and the
    embeddings [k, C] of cfg's start / end / sep token strings (None where the string is None)."""
    for name, text, emb in (("start", cfg.start_tokens, start), ("end", cfg.end_tokens, end),
                            ("sep", cfg.sep_tokens, sep)):
        if (text is None) != (emb is None):
            raise ValueError(f"the {name} token embeddings must be given exactly when the config has {name} tokens")
    out = []
    for pool_size in cfg.pool_sizes:
        out.append(_around(pool_frames(frame_features, pool_size), start, end))
        if sep is not None:
            out.append(sep)
    return torch.cat(out)


def video_tokens(frames: int, tokens_per_frame: int, cfg: VideoEncoderConfig, *, start_tokens: int = 0,
                 end_tokens: int = 0, sep_tokens: int = 0) -> int:
    """How many LLM tokens `encode_video` makes: the *_tokens counts are the lengths of the embedded strings."""
    side = math.isqrt(tokens_per_frame)
    total = 0
    for t, h, w in cfg.pool_sizes:
        if side * side != tokens_per_frame or frames % t or side % h or side % w:
            raise ValueError(f"pool size {[t, h, w]} does not divide {frames} frames of {tokens_per_frame} tokens")
        total += frames // t * (start_tokens + (side // h) * (side // w) + end_tokens) + sep_tokens
    return total
