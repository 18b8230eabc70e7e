"""Image embeddings cached by content hash, in a bounded LRU: the same picture sent again (a
new conversation about it, a client that resends the whole history) is not re-encoded.

`CachedImages` stands in for the model in front of the session: everything is the model's,
except `encode_images`, which looks each image up by `image_key` (a hash of its pixels) and runs
the vision tower only when one is missing, on the request's images together, as the plain path does.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import torch

from edge_vlm.session import image_key


class CachedImages:
    def __init__(self, model, capacity: int = 64):
        self._model = model
        self.capacity = capacity
        self._lru: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self._calls = threading.local()  # per thread: lanes of --parallel encode side by side

    @property
    def encode_s(self) -> float:
        """Vision time of this thread's last call (0 when every image was cached)."""
        return getattr(self._calls, "encode_s", 0.0)

    @encode_s.setter
    def encode_s(self, value: float) -> None:
        self._calls.encode_s = value

    def __getattr__(self, name):  # everything else is the model's own
        return getattr(self._model, name)

    def __len__(self) -> int:
        return len(self._lru)

    def _keys(self, images) -> list[str]:
        """One key per image: its pixels, and for dynamic S2 (NVILA) whether it is alone in its
        message, which decides its tiling and so its embeddings."""
        alone = f":alone={len(images) == 1}" if self._model.images_vary_in_length else ""
        return [image_key(im) + alone for im in images]

    def encode_images(self, images) -> torch.Tensor | list[torch.Tensor]:
        """As the model's `encode_images`: a [N, tokens, hidden] tensor, or one block per picture for
        models whose pictures take different numbers of tokens (dynamic S2)."""
        t0 = time.perf_counter()
        keys = self._keys(images)
        with self._lock:
            found = [self._lru.get(k) for k in keys]
        if self.capacity > 0 and all(f is not None for f in found):
            with self._lock:
                for k in keys:
                    self._lru.move_to_end(k)
                self.hits += len(keys)
            self.encode_s = 0.0
            return list(found) if self._model.images_vary_in_length else torch.stack(found)
        out = self._model.encode_images(images)
        with self._lock:
            self.misses += len(keys)  # all of them ran through the tower
            if self.capacity > 0:
                for k, row in zip(keys, out):
                    self._lru[k] = row.clone()
                    self._lru.move_to_end(k)
                while len(self._lru) > self.capacity:
                    self._lru.popitem(last=False)
        self.encode_s = time.perf_counter() - t0
        return out
