"""Image embeddings cached by content hash, in a bounded LRU: the same picture sent again (a
new conversation about it, a client that resends the whole history) is not re-encoded.

`CachedImages` is an image encoder (contracts.ImageEncoder) in front of another one, the model's
own: it looks each picture up by `image_key` (a hash of its pixels) and runs the inner encoder
only when one is missing, on the message's pictures together, as the plain path does. The
session times it like any encoder (GenerationStats.vision_s): a hit costs only the lookup.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

import torch

from edge_vlm.contracts import ImageEncoder
from edge_vlm.conversation import image_key
from edge_vlm.imaging.video import is_video_frame
from edge_vlm.vlm import VisionLanguageModel


class CachedImages:
    def __init__(self, encode: ImageEncoder, per_picture_blocks: bool, capacity: int = 64):
        """`encode`: the encoder whose embeddings are kept (the model's `encode_images`);
        `per_picture_blocks`: it gives one block per picture, sized by whether the picture is alone
        in its message (the model's `images_vary_in_length`: NVILA's dynamic S2)."""
        self.encode = encode
        self.per_picture_blocks = per_picture_blocks
        self.capacity = capacity
        self._lru: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # lanes of --parallel encode side by side
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._lru)

    def _keys(self, images) -> list[str]:
        """One key per image: its pixels, and for dynamic S2 (NVILA) whether it is its message's only
        image (video frames aside), which decides its tiling and so its embeddings."""
        if not self.per_picture_blocks:
            return [image_key(im) for im in images]
        lone = VisionLanguageModel.lone_image(images)
        return [f"{image_key(im)}:alone={lone and not is_video_frame(im)}" for im in images]

    def __call__(self, images: Sequence) -> torch.Tensor | list[torch.Tensor]:
        """As the inner encoder: a [N, tokens, hidden] tensor, or one block per picture."""
        keys = self._keys(images)
        with self._lock:
            found = [self._lru.get(k) for k in keys]
            if self.capacity > 0 and all(f is not None for f in found):
                for k in keys:
                    self._lru.move_to_end(k)
                self.hits += len(keys)
                return list(found) if self.per_picture_blocks else torch.stack(found)
        out = self.encode(images)
        with self._lock:
            self.misses += len(keys)  # all of them ran through the tower
            if self.capacity > 0:
                for k, row in zip(keys, out):
                    self._lru[k] = row.clone()
                    self._lru.move_to_end(k)
                while len(self._lru) > self.capacity:
                    self._lru.popitem(last=False)
        return out
