"""`OnnxVisionEncoder`: images -> LLM-space embeddings from an ONNX Runtime session.

The same contract as `VisionLanguageModel.encode_images` (the model's own preprocessing, then the
tower and projector, then the LLM's dtype and device), so a model can use either interchangeably.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...imaging.preprocess import preprocess
from .providers import SHORT_NAMES, ProviderPlan

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def open_session(path: Path, plan: ProviderPlan):
    """An InferenceSession on exactly the plan's providers: a provider that fails to start raises here,
    instead of ONNX Runtime quietly retrying on another one."""
    # optional: onnxruntime (the onnx extra)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: the caller reports failures in one line of its own
    opts.intra_op_num_threads = torch.get_num_threads()  # the same cores the torch tower would use
    return ort.InferenceSession(str(path), opts, providers=plan.providers, enable_fallback=0)


class OnnxVisionEncoder:
    """Callable like `encode_images`; `provider` names the execution provider that runs the graph."""

    def __init__(self, session, image_cfg, precision: str, device, dtype: torch.dtype, max_batch: int | None = None,
                 note: str = "", tower_only: bool = False):
        """`note`: why this precision and not the provider's first choice (shown by `describe`).
        `tower_only`: the graph is the tower alone (S2 models): `encode_pixels` gives the tower's features of
        each tile, which the model merges across scales and projects itself."""
        self.session, self.image_cfg, self.precision, self.note = session, image_cfg, precision, note
        self.tower_only = tower_only
        self.device, self.dtype = torch.device(device), dtype
        self.max_batch = max_batch
        inp = session.get_inputs()[0]
        self.input_name, self.input_dtype = inp.name, _NUMPY[inp.type]

    @classmethod
    def open(cls, path: Path, image_cfg, plan: ProviderPlan, device, dtype: torch.dtype,
             note: str = "", tower_only: bool = False) -> "OnnxVisionEncoder":
        return cls(open_session(path, plan), image_cfg, plan.precision, device, dtype, plan.max_batch, note,
                   tower_only)

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def describe(self) -> str:
        """For `edge-vlm info` and the stats line, e.g. "onnxruntime CPU int8", or
        "onnxruntime CPU fp32 (int8 refused: cosine 0.9815 < bound 0.99)"."""
        text = f"onnxruntime {SHORT_NAMES.get(self.provider, self.provider)} {self.precision}"
        notes = [n for n in (self.note, "tower only: S2 merge and projector in torch" if self.tower_only else "") if n]
        return f"{text} ({'; '.join(notes)})" if notes else text

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels [N, 3, S, S] -> [N, tokens, hidden] in the LLM's dtype, on its device."""
        x = pixels.detach().to("cpu", torch.float32).numpy().astype(self.input_dtype, copy=False)
        step = self.max_batch or len(x)
        outs = [self.session.run(None, {self.input_name: x[i:i + step]})[0] for i in range(0, len(x), step)]
        feats = torch.from_numpy(np.concatenate(outs) if len(outs) > 1 else outs[0])
        return feats.to(self.device, self.dtype)

    def __call__(self, images) -> torch.Tensor:
        if self.tower_only:
            raise TypeError("a tower-only graph gives tile features, not embeddings: the model calls encode_pixels")
        return self.encode_pixels(preprocess(images, self.image_cfg))
