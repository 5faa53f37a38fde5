"""Reading and writing PyTorch-layout checkpoint files, one tensor at a time.

Safetensors is parsed here directly (an 8-byte header length, a JSON header, raw bytes), so
bf16 stays bit-exact through ml_dtypes, a tensor is read with one ``seek``/``readinto``
without mapping the whole file, and a truncated or corrupt shard is reported with the tensor
and file names. ``pytorch_model.bin`` files are read with
``torch.load(..., weights_only=True, mmap=True)``, the only place torch is needed.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from mufun_jax.convert import to_numpy
from mufun_jax.errors import CheckpointError  # noqa: F401 - its home is errors; some CLIs import it from here

ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", raw)
                if n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{self.path}: corrupt safetensors header (length {n}, file size {size})")
                header = json.loads(f.read(n))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: cannot read safetensors header: {e}") from e
        self.metadata = header.pop("__metadata__", None) or {}  # free-form strings (PEFT adapters: ours)
        self._base = 8 + n
        self._entries = header
        for key, e in header.items():
            start, end = e["data_offsets"]
            if self._base + end > size:
                raise CheckpointError(
                    f"{self.path}: tensor {key!r} ends at byte {self._base + end} but the file has {size} bytes "
                    "(truncated or corrupt shard)")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype_name(self, key: str) -> str:
        return self._entries[key]["dtype"]

    def itemsize(self, key: str) -> int:
        return ST_DTYPES[self.dtype_name(key)].itemsize if self.dtype_name(key) in ST_DTYPES else 1

    def read(self, key: str) -> np.ndarray:
        e = self._entries[key]
        if e["dtype"] not in ST_DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {key!r} has dtype {e['dtype']}; supported: {sorted(ST_DTYPES)}")
        dtype = ST_DTYPES[e["dtype"]]
        start, end = e["data_offsets"]
        count = int(np.prod(e["shape"], dtype=np.int64))
        if end - start != count * dtype.itemsize:
            raise CheckpointError(f"{self.path}: tensor {key!r} has {end - start} bytes for shape {e['shape']} "
                                  f"{e['dtype']}")
        out = np.empty(e["shape"], dtype)
        with open(self.path, "rb") as f:
            f.seek(self._base + start)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != end - start:
            raise CheckpointError(f"{self.path}: tensor {key!r} is truncated ({got} of {end - start} bytes)")
        return out


class TorchBinFile:
    """A ``pytorch_model.bin`` read with ``weights_only=True`` (no pickle code runs) and mmap."""

    def __init__(self, path: str | Path):
        import torch  # optional: only pytorch_model.bin files need it

        self.path = Path(path)
        try:
            self._sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for corrupt zips and pickles
            raise CheckpointError(f"{self.path}: cannot load with torch.load(weights_only=True): {e}") from e
        if not isinstance(self._sd, dict):
            raise CheckpointError(f"{self.path}: expected a state dict, got {type(self._sd).__name__}")

    def keys(self) -> list[str]:
        return list(self._sd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._sd[key].shape)

    def dtype_name(self, key: str) -> str:
        return str(self._sd[key].dtype).replace("torch.", "")

    def itemsize(self, key: str) -> int:
        return self._sd[key].element_size()

    def read(self, key: str) -> np.ndarray:
        import torch  # as in __init__

        t = self._sd[key]
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise CheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {t.dtype}")
        return np.array(to_numpy(t))


class TensorIndex:
    """All tensors of one HF-style folder, by key, whichever file each lives in."""

    def __init__(self, files: dict[str, object], where: str):
        self._files = files  # key -> reader
        self.where = where

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, key: str) -> bool:
        return key in self._files

    def shape(self, key: str) -> tuple[int, ...]:
        return self._files[key].shape(key)

    def read(self, key: str) -> np.ndarray:
        return self._files[key].read(key)

    def itemsize(self, key: str) -> int:
        return self._files[key].itemsize(key)

    def file_of(self, key: str) -> Path:
        return self._files[key].path


def open_folder(folder: str | Path) -> TensorIndex:
    """Index the weights of an HF-style folder: a safetensors index, a single safetensors file,
    a ``pytorch_model.bin`` index or a single ``pytorch_model.bin``, in that order of preference."""
    folder = Path(folder)
    for index_name, reader in (("model.safetensors.index.json", SafetensorsFile),
                               ("pytorch_model.bin.index.json", TorchBinFile)):
        index_path = folder / index_name
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path}: not a valid index file ({e})") from e
            opened, files = {}, {}
            for key, fname in weight_map.items():
                if fname not in opened:
                    if not (folder / fname).exists():
                        raise CheckpointError(f"{index_path}: tensor {key!r} points at {fname}, which does not exist")
                    opened[fname] = reader(folder / fname)
                if key not in opened[fname].keys():
                    raise CheckpointError(f"{index_path}: tensor {key!r} is not in {fname}")
                files[key] = opened[fname]
            return TensorIndex(files, str(folder))
    for name, reader in (("model.safetensors", SafetensorsFile), ("pytorch_model.bin", TorchBinFile)):
        if (folder / name).exists():
            f = reader(folder / name)
            return TensorIndex({k: f for k in f.keys()}, str(folder))
    raise CheckpointError(
        f"{folder}: no weights found (expected model.safetensors[.index.json] or pytorch_model.bin[.index.json])")


def plan_shards(entries: Iterable[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int) -> list[list]:
    """Group (key, shape, dtype) in order into shards of at most ``max_shard_bytes`` (a larger
    tensor gets a shard of its own)."""
    shards, cur, cur_bytes = [], [], 0
    for key, shape, dtype in entries:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if cur and cur_bytes + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((key, tuple(shape), np.dtype(dtype)))
        cur_bytes += n
    if cur:
        shards.append(cur)
    return shards


def write_safetensors_shards(folder: Path, shards: list[list], tensors: Iterator[tuple[str, np.ndarray]],
                             progress=None, *, name: str = "model", metadata: dict[str, str] | None = None
                             ) -> dict[str, str]:
    """Write planned shards, consuming ``tensors`` (in plan order) one at a time, plus
    ``{name}.safetensors.index.json`` when there is more than one shard. Returns the weight map.
    ``metadata`` (strings) joins ``format: pt`` in each header."""
    n = len(shards)
    n_tensors = sum(len(s) for s in shards)
    weight_map = {}
    total = 0
    for si, shard in enumerate(shards):
        fname = f"{name}.safetensors" if n == 1 else f"{name}-{si + 1:05d}-of-{n:05d}.safetensors"
        header, offset = {}, 0
        for key, shape, dtype in shard:
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[key] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt", **(metadata or {})}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for key, shape, dtype in shard:
                got_key, a = next(tensors)
                if got_key != key or a.shape != shape or a.dtype != dtype:
                    raise RuntimeError(f"export order mismatch: expected {key} {shape} {dtype}, got {got_key} "
                                       f"{a.shape} {a.dtype}")
                f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
                weight_map[key] = fname
                if progress is not None:
                    progress.set_postfix_str(f"{len(weight_map)}/{n_tensors} tensors", refresh=False)
                    progress.update(a.nbytes)
            f.flush()
            os.fsync(f.fileno())
        total += offset
    if n > 1:
        (folder / f"{name}.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return weight_map
