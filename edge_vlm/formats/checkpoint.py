"""Finding and reading checkpoint files: local folders or Hugging Face repos, safetensors
(single or sharded) with a `.bin` fallback, validated before use so a truncated download
gives a clear message instead of a crash deep inside loading."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..errors import CheckpointError

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
              "I64": torch.int64, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.py"]


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local folder as is; otherwise a Hugging Face repo id, fetched (or taken from the cache)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"model path must be a folder, got a file: {path}")
        return path
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"model folder not found: {name}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=WEIGHT_PATTERNS + ["*/*"]))
    except Exception as e:  # noqa: BLE001 - network, auth, offline: all become one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{name!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"(offline? private?): {reason}") from None


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"missing {path.name} in {path.parent}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def load_torch_file(path: Path) -> dict:
    """A `torch.save`d state dict, memory-mapped where the file allows it.

    Mapped tensors are read from the page cache as they are copied to the device and never
    all sit in process memory at once: on a Jetson, whose CPU and GPU share one memory, that
    is the difference between holding a 1.7 GB checkpoint once and holding it twice. Files in
    the legacy (pre-zip) format cannot be mapped and are read whole.
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"cannot read {path} (corrupt or truncated): {e}") from None


def check_safetensors(path: Path) -> None:
    """Verify the header parses and the file holds every byte it declares."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                raise ValueError("header length beyond end of file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file (corrupt or truncated): {e}") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: {size} bytes on disk, {8 + n + end} expected (re-download it)")


class TensorStore:
    """Name -> tensor access over all weight files of one folder, loaded lazily."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._where: dict[str, Path] = {}
        self._bin: dict[str, torch.Tensor] = {}
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            for key, fname in read_json(index)["weight_map"].items():
                self._where[key] = self.folder / fname
            files = sorted(set(self._where.values()))
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"missing weight shard {f.name} in {self.folder}")
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if files:
            from safetensors import safe_open

            for f in files:
                check_safetensors(f)
                if not index.is_file():
                    with safe_open(str(f), "pt") as h:
                        for key in h.keys():
                            self._where[key] = f
        else:
            bins = sorted(self.folder.glob("pytorch_model*.bin"))
            if not bins:
                raise CheckpointError(f"no weights in {self.folder}: expected *.safetensors or pytorch_model*.bin")
            for f in bins:
                self._bin.update(load_torch_file(f))
        self._handles: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self._where) + list(self._bin)

    def __contains__(self, key: str) -> bool:
        return key in self._where or key in self._bin

    def get(self, key: str) -> torch.Tensor:
        if key in self._bin:
            return self._bin[key]
        from safetensors import SafetensorError, safe_open

        f = self._where[key]
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), "pt")
        try:
            return self._handles[f].get_tensor(key)
        except SafetensorError as e:
            raise CheckpointError(f"cannot read tensor {key} from {f}: {e}") from None

    def meta(self, key: str) -> torch.Tensor:
        """A meta-device tensor with the stored shape and dtype, read from the header only."""
        if key in self._bin:
            return self._bin[key].to("meta")
        from safetensors import safe_open

        f = self._where[key]
        if f not in self._handles:
            self._handles[f] = safe_open(str(f), "pt")
        sl = self._handles[f].get_slice(key)
        return torch.empty(sl.get_shape(), dtype=_ST_DTYPES.get(sl.get_dtype(), torch.float16), device="meta")

    def nbytes(self) -> int:
        files = set(self._where.values())
        return sum(f.stat().st_size for f in files) + sum(t.numel() * t.element_size() for t in self._bin.values())


def load_into(module: torch.nn.Module, store: TensorStore, rename, dtype: torch.dtype, device,
              progress=None, optional: tuple[str, ...] = ()) -> None:
    """Fill a module built on the meta device with tensors from `store`.

    `rename(checkpoint_key) -> module_key | None` maps names (None skips a tensor). Every
    module parameter must be found, except names ending in one of `optional` (tied weights).
    Floating tensors are cast to `dtype`; integer ones (packed int4) keep theirs. On the
    "meta" device nothing is read but the headers (for `edge-vlm info`).
    """
    wanted = dict(module.state_dict(keep_vars=True))
    state: dict[str, torch.Tensor] = {}
    keys = store.keys()
    for key in (progress(keys) if progress else keys):
        name = rename(key)
        if name is None or name not in wanted:
            continue
        t = store.meta(key) if str(device) == "meta" else store.get(key)
        if tuple(t.shape) != tuple(wanted[name].shape):
            raise CheckpointError(
                f"{key} in {store.folder} has shape {tuple(t.shape)}, expected {tuple(wanted[name].shape)} "
                f"(config.json does not match the weights)")
        state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    missing = [n for n in wanted if n not in state and not n.endswith(optional)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"weights in {store.folder} lack {missing[0]}{more}: incomplete or wrong checkpoint")
    module.load_state_dict(state, strict=False, assign=True)
    module.requires_grad_(False)  # inference only: no autograd bookkeeping
