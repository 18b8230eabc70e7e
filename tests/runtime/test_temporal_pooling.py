"""NVILA's video encoders (BasicVideoEncoder, TSPVideoEncoder) and image encoder settings against a plain
reading of llava/model/encoders: pooled cells averaged one by one, tokens laid out frame by frame."""

from __future__ import annotations

import pytest
import torch

from edge_vlm.errors import UnsupportedModelError
from edge_vlm.formats.vila_encoders import ImageEncoderConfig, VideoEncoderConfig
from edge_vlm.models.media_encoders import encode_video, pool_frames, video_tokens


def reference_pool(frames, pool_size):
    """Output frame f, cell (i, j): the mean over frames f*t .. f*t+t-1, rows i*h .., columns j*w .."""
    n, tokens, c = frames.shape
    side = int(round(tokens ** 0.5))
    t, h, w = pool_size
    grid = frames.reshape(n, side, side, c).double()
    out = torch.zeros(n // t, (side // h) * (side // w), c, dtype=torch.float64)
    for f in range(n // t):
        for i in range(side // h):
            for j in range(side // w):
                cell = grid[f * t:(f + 1) * t, i * h:(i + 1) * h, j * w:(j + 1) * w]
                out[f, i * (side // w) + j] = cell.reshape(-1, c).mean(0)
    return out


def reference_encode(frames, pool_sizes, start, end, sep):
    """TSPVideoEncoder: per pool size, per pooled frame [start] + tokens + [end], then [sep] once."""
    pieces = []
    for pool_size in pool_sizes:
        for frame in reference_pool(frames, pool_size):
            pieces += ([start.double()] if start is not None else []) + [frame] + \
                ([end.double()] if end is not None else [])
        if sep is not None:
            pieces.append(sep.double())
    return torch.cat(pieces)


@pytest.mark.parametrize("pool_sizes", [[[1, 1, 1]], [[8, 1, 1]], [[2, 2, 2]], [[1, 4, 2]], [[4, 2, 1], [8, 1, 1]],
                                        [[1, 1, 1], [2, 4, 4], [8, 2, 2]]])
@pytest.mark.parametrize("tokens", [(None, "\n", None), ("<s>", "\n", "<sep>"), (None, None, None),
                                    ("<s>", None, "<sep>")])
def test_encode_video_matches_the_reference(pool_sizes, tokens):
    start_text, end_text, sep_text = tokens
    cfg = VideoEncoderConfig(tuple(tuple(p) for p in pool_sizes), start_text, end_text, sep_text)
    gen = torch.Generator().manual_seed(len(pool_sizes))
    frames = torch.randn(8, 16, 5, generator=gen)  # 8 frames of 4x4 tokens
    start = torch.randn(2, 5, generator=gen) if start_text else None
    end = torch.randn(1, 5, generator=gen) if end_text else None
    sep = torch.randn(3, 5, generator=gen) if sep_text else None
    got = encode_video(frames, cfg, start, end, sep)
    want = reference_encode(frames, pool_sizes, start, end, sep)
    assert got.shape == want.shape and (got.double() - want).abs().max() < 1e-6
    assert video_tokens(8, 16, cfg, start_tokens=2 if start_text else 0, end_tokens=1 if end_text else 0,
                        sep_tokens=3 if sep_text else 0) == got.shape[0]


def test_basic_video_encoder_wraps_every_frame():
    """BasicVideoEncoder (the default): frame by frame, the frame's tokens then "\\n"'s embedding."""
    frames, end = torch.randn(3, 4, 2), torch.randn(1, 2)
    got = encode_video(frames, VideoEncoderConfig.from_vila(None), end=end)
    want = torch.cat([torch.cat([f, end]) for f in frames])
    assert torch.equal(got, want)


def test_pool_frames_keeps_the_dtype_and_averages():
    frames = torch.arange(4 * 4 * 1, dtype=torch.bfloat16).reshape(1, 16, 1).repeat(2, 1, 1)
    pooled = pool_frames(frames, (2, 2, 2))
    assert pooled.dtype == torch.bfloat16 and pooled.shape == (1, 4, 1)
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # means of the 2x2 blocks of 0..15


def test_nvila_tsp_count():
    """NVILA's stage-4 video encoder, 8x1x1 over 256 frames of 16x16 tokens, "\\n" one token: 32 * 257."""
    cfg = VideoEncoderConfig.from_vila('{"_target_": "llava.model.encoders.TSPVideoEncoder", '
                                       '"pool_sizes": [[8, 1, 1]]}')
    assert cfg.pool_sizes == ((8, 1, 1),) and cfg.end_tokens == "\n" and cfg.sep_tokens is None
    assert video_tokens(256, 256, cfg, end_tokens=1) == 32 * 257


def test_indivisible_pools_are_refused():
    cfg = VideoEncoderConfig(((8, 1, 1),))
    with pytest.raises(ValueError, match=r"pool size \[8, 1, 1\] does not divide 6 frames"):
        encode_video(torch.randn(6, 16, 2), cfg, end=torch.randn(1, 2))
    with pytest.raises(ValueError, match="does not divide"):
        video_tokens(6, 16, cfg, end_tokens=1)
    with pytest.raises(ValueError, match="does not divide"):
        pool_frames(torch.randn(8, 16, 2), (1, 3, 1))
    with pytest.raises(ValueError, match="square grid"):
        pool_frames(torch.randn(8, 15, 2), (1, 1, 1))
    with pytest.raises(ValueError, match="end token embeddings"):
        encode_video(torch.randn(8, 16, 2), cfg)  # the config has "\n" as end tokens


def test_image_encoder_config():
    assert ImageEncoderConfig.from_vila(None) == ImageEncoderConfig(None, "\n")
    assert ImageEncoderConfig.from_vila('{"_target_": "llava.model.encoders.BasicImageEncoder"}').end_tokens == "\n"
    custom = ImageEncoderConfig.from_vila({"_target_": "llava.model.encoders.BasicImageEncoder",
                                           "start_tokens": "<image>", "end_tokens": None})
    assert (custom.start_tokens, custom.end_tokens) == ("<image>", None)


@pytest.mark.parametrize("value,message", [
    ('{"_target_": "llava.model.encoders.FancyVideoEncoder"}', "unsupported video_encoder 'FancyVideoEncoder'"),
    ('{"_target_": "llava.model.encoders.TSPVideoEncoder"}', "needs pool_sizes"),
    ('{"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1]]}', "triples of positive"),
    ('{"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[0, 1, 1]]}', "triples of positive"),
    ('{"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": 8}', "not a list of triples"),
    ('{"_target_": "llava.model.encoders.BasicVideoEncoder", "pool_sizes": [[8, 1, 1]]}', "with pool_sizes"),
    ('{"_target_": "llava.model.encoders.BasicVideoEncoder", "end_tokens": 5}', "end_tokens 5 is not a string"),
    ("not json", "not a JSON object"),
    ("[1, 2]", "not a JSON object"),
])
def test_bad_video_encoders_are_refused_clearly(value, message):
    with pytest.raises(UnsupportedModelError, match=message):
        VideoEncoderConfig.from_vila(value)
