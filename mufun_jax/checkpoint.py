"""The model directory: the one on-disk layout of a MuFun model, its one writer and its one reader.

Layout (written by ``convert_weights.py import`` and by training's export alike)::

    DIR/mufun_config.json    MuFunConfig.to_dict(): architecture only, no run settings
    DIR/params/              Orbax checkpoint of {"encoder", "connector", "language_model"}, layers
                             stacked on a leading axis as the model holds them; one plain zarr3 array
                             per parameter (no OCDBT, no compression), chunked by layer first
    DIR/<tokenizer files>    when the source had them

A training run's own checkpoints (``OUTPUT_DIR/checkpoints/<step>/``: the trainable state and the
loader's position, never the frozen weights) are Orbax's standard layout; their reader and writer
live with the rest of the run directory, in :mod:`mufun_jax.run_dir`.

A damaged directory (a parameter's folder, its ``zarr.json`` or a data chunk gone or cut short)
is reported as a :class:`CheckpointError` that names the parameter and the file.

Plain per-parameter arrays let the converter stream one parameter at a time, and let the exporter
read one layer of a stacked parameter at a time. Writes go to a hidden sibling that is renamed
into place only when complete, so an interrupted run never leaves something that looks valid.

:func:`load_params` reads parameters straight into the dtype and sharding of an abstract tree;
assembling a model from them (or from a PyTorch checkpoint, an adapter, quantisation and a mesh)
is :mod:`mufun_jax.loading`'s job, one floor up.

jax, Orbax and TensorStore are imported inside the functions that use them: the training config
reads a model directory's config through this module before a CLI has chosen its platform
(``JAX_PLATFORMS`` is read once, when jax is first imported), and the converter's CLI stays quick.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

from mufun_jax.config import MuFunConfig
from mufun_jax.errors import CheckpointError

log = logging.getLogger(__name__)

CONFIG_NAME = "mufun_config.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja")

ParamPath = tuple[str, ...]


def location(path):
    """A local path made absolute (Orbax needs it), or a ``gs://...`` URL as an ``epath.Path``."""
    if "://" in str(path):
        from etils import epath  # only for gs:// URLs

        return epath.Path(str(path))
    return Path(path).resolve()


def has_model(path) -> bool:
    p = location(path)
    return (p / CONFIG_NAME).exists() and (p / PARAMS_DIR).is_dir()


def load_config(path) -> MuFunConfig:
    p = location(path)
    if not (p / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{p}: not a MuFun model directory (no {PARAMS_DIR}/); run convert_weights.py import "
                              "first")
    try:
        d = json.loads((p / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{p / CONFIG_NAME}: missing (the model config)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p / CONFIG_NAME}: not valid JSON ({e})") from e
    return MuFunConfig.from_dict(d)


# -- Orbax, quietly -----------------------------------------------------------------------------

# Orbax's notices about the OCDBT format, which this layout does not use on purpose; on a plain
# per-array checkpoint they read like corruption ("may be a sign of a malformed checkpoint").
_OCDBT_NOTICES = ("TensorStore data files not found", "Skipping merge of OCDBT checkpoints")


class _DropOcdbtNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(s in record.getMessage() for s in _OCDBT_NOTICES)


@contextlib.contextmanager
def _orbax():
    """Our save options, with Orbax's OCDBT notices filtered. Measured on a 2 GB leaf: the defaults
    (OCDBT, defensive host copy) add ~4.2 GB of peak RSS; plain zarr3 per leaf, no host copy and
    16 MB chunks add ~0.45 GB, and write at over 1 GB/s. Weights do not compress."""
    import orbax.checkpoint.experimental.v1 as ocp  # heavy; imports jax (see the module docstring)

    ctx = ocp.Context()
    ctx.array.saving.use_ocdbt = False
    ctx.array.saving.use_compression = False
    ctx.array.saving.storage_options.chunk_byte_size = 16 << 20
    ctx.array.saving.storage_options.shard_axes = (0,)  # chunks split by layer first: export reads one layer
    ctx.memory.deepcopy_host_arrays = False
    _quiet_abandoned_reads()
    flt = _DropOcdbtNotices()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(flt)
    try:
        with ctx:
            yield ocp
    finally:
        absl_logger.removeFilter(flt)


# -- writing ------------------------------------------------------------------------------------


def _nest(path: ParamPath, value) -> dict:
    out = value
    for p in reversed(path):
        out = {p: out}
    return out


def _sync(name: str) -> None:
    import jax  # on first use (see the module docstring)

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # as jax above

        multihost_utils.sync_global_devices(name)


def save_model(dst, cfg: MuFunConfig, params: Mapping | Iterable[tuple[ParamPath, np.ndarray]], *,
               tokenizer=None, tokenizer_dir=None, overwrite: bool = False) -> None:
    """Write a model directory. ``params`` is the whole tree (nested dicts of jax or numpy arrays,
    possibly sharded over hosts: every process calls this) or an iterator of ``(path, array)`` that
    is saved one parameter at a time (the converter's streaming import). ``tokenizer`` (an HF
    tokenizer) or ``tokenizer_dir`` (its files are copied) adds the tokenizer."""
    import jax  # on first use (see the module docstring)

    dst = location(dst)
    tmp = dst.parent / f".{dst.name}.tmp"
    main = jax.process_index() == 0
    if main:
        if dst.exists() and not overwrite:
            raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
        for stale in (tmp, tmp / f"{PARAMS_DIR}.partial_save"):
            if stale.exists():
                _rmtree(stale)
        tmp.mkdir(parents=True)
    _sync("mufun_save_start")
    try:
        with _orbax() as ocp:
            if isinstance(params, Mapping):
                ocp.save(tmp / PARAMS_DIR, params)
            else:
                for path, a in params:
                    ocp.partial.save(tmp / PARAMS_DIR, _nest(path, a))
                    del a
                    _release_freed_memory()
                ocp.partial.finalize(tmp / PARAMS_DIR)
        if main:
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2))
            _write_tokenizer(tmp, tokenizer, tokenizer_dir)
        _sync("mufun_save_written")
        if main:
            old = dst.parent / f".{dst.name}.old"
            if old.exists():
                _rmtree(old)
            if dst.exists():
                dst.rename(old)
            tmp.rename(dst)
            if old.exists():
                _rmtree(old)
    except BaseException:
        if main:
            for leftover in (tmp, Path(str(tmp / PARAMS_DIR) + ".partial_save")):
                if leftover.exists():
                    _rmtree(leftover)
        raise
    _sync("mufun_save_done")


def _rmtree(p) -> None:
    if isinstance(p, Path):
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.rmtree()


def _write_tokenizer(dst, tokenizer, tokenizer_dir) -> None:
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                (dst / name).write_bytes((Path(tokenizer_dir) / name).read_bytes())
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as local:  # save_pretrained wants a local folder; dst may be gs://
            tokenizer.save_pretrained(local)
            for f in Path(local).iterdir():
                (dst / f.name).write_bytes(f.read_bytes())


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them in per-thread arenas, which after a
    few 100 MB tensors read on TensorStore's threads added ~1.5 GB to the converter's peak RSS)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


# -- reading ------------------------------------------------------------------------------------


def param_metadata(path) -> dict[ParamPath, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every stored parameter, without reading any. A parameter whose files are
    gone or damaged raises CheckpointError naming it (Orbax itself then reports an empty tree)."""
    import jax  # on first use (see the module docstring)

    try:
        with _orbax() as ocp:
            meta = ocp.metadata(location(path) / PARAMS_DIR).metadata
    except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types; name the broken file
        _raise_broken(path, e)
    flat = jax.tree_util.tree_flatten_with_path(meta, is_leaf=lambda x: hasattr(x, "shape"))[0]
    out = {tuple(k.key for k in kp): (tuple(v.shape), np.dtype(v.dtype)) for kp, v in flat}
    if len(out) < len(_stored_names(path) or ()):
        _raise_broken(path, None)
    return out


def _stored_names(path) -> list[ParamPath] | None:
    """The parameter names the checkpoint's own index (``params/state/_METADATA``) lists, or None
    when that index is unreadable or of another layout."""
    try:
        tree = json.loads((location(path) / PARAMS_DIR / "state" / "_METADATA").read_text())["tree_metadata"]
        return [tuple(k["key"] for k in v["key_metadata"]) for v in tree.values()]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _quiet_abandoned_reads() -> None:
    """After a failed load, Orbax's other reads are abandoned: their coroutines and TensorStore's
    callbacks into its closed event loop each print a traceback ("Event loop is closed") through
    ``sys.unraisablehook``, hundreds of lines under the one error that matters. Drop those two kinds."""
    previous = sys.unraisablehook
    if getattr(previous, "_mufun_quiet", False):
        return

    def hook(u):
        if (isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)) or \
                "orbax" in repr(getattr(u, "object", None)):
            return
        previous(u)

    hook._mufun_quiet = True
    sys.unraisablehook = hook


def _raise_broken(path, cause: Exception | None, read_data: bool = False):
    """Find the first parameter whose files cannot be read and raise CheckpointError naming it and
    the file; re-raise ``cause`` (as CheckpointError) when every file looks intact. With
    ``read_data`` each array is read whole (on the error path only: it costs a full read)."""
    names = _stored_names(path)
    state = location(path) / PARAMS_DIR / "state"
    if names is None:
        raise CheckpointError(f"{path}: the parameter index {state / '_METADATA'} is missing or damaged; the model "
                              "directory is incomplete (convert or export it again)") from cause
    for name in names:
        leaf = state / ".".join(name)
        what = f"{path}: parameter {'.'.join(name)} is unreadable"
        if not isinstance(leaf, Path):
            break
        try:
            json.loads((leaf / "zarr.json").read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{what}: {leaf / 'zarr.json'} does not exist") from cause
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{what}: {leaf / 'zarr.json'} is damaged ({e})") from cause
        if read_data:
            try:
                _zarr_leaf(path, name).read().result()
            except Exception as e:  # noqa: BLE001 - TensorStore's errors are ValueError/RuntimeError/...
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise CheckpointError(f"{what}: a data file under {leaf} is damaged ({first[:300]})") from cause
    msg = str(cause).splitlines()[0] if cause is not None and str(cause) else "unknown reason"
    raise CheckpointError(f"{path}: cannot read the parameters ({msg[:300]})") from cause


def _flat(tree, prefix=()) -> dict[ParamPath, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def load_params(path, abstract: Mapping | None = None) -> dict:
    """Read the parameters into the nested tree ``abstract`` of ``jax.ShapeDtypeStruct`` (with
    shardings): each is read straight into its dtype and placement. Stored parameters that
    ``abstract`` lacks are not read; missing ones and shape mismatches raise CheckpointError.
    Without ``abstract``: every parameter, as stored, on the default device."""
    import jax  # on first use (see the module docstring)

    meta = param_metadata(path)
    if abstract is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = {}
        for p, (shape, dtype) in meta.items():
            node = abstract
            for k in p[:-1]:
                node = node.setdefault(k, {})
            node[p[-1]] = jax.ShapeDtypeStruct(shape, dtype, sharding=dev)
    want = _flat(abstract)
    missing = sorted(set(want) - set(meta))
    wrong = [(p, meta[p][0], tuple(want[p].shape)) for p in want if p in meta and meta[p][0] != tuple(want[p].shape)]
    if missing or wrong:
        raise CheckpointError(f"{path}: the parameters do not match the model config: missing "
                              f"{['.'.join(p) for p in missing[:5]]}, shape mismatches "
                              f"{[('.'.join(p), h, w) for p, h, w in wrong[:5]]}")
    with _orbax() as ocp:
        tree = {}
        for p in meta:
            node = tree
            for k in p[:-1]:
                node = node.setdefault(k, {})
            node[p[-1]] = want.get(p, ocp.PLACEHOLDER)
        try:
            out = ocp.load(location(path) / PARAMS_DIR, tree)
        except Exception as e:  # noqa: BLE001 - e.g. DATA_LOSS from a truncated chunk: name the parameter
            _raise_broken(path, e, read_data=True)
    return _drop_placeholders(out, ocp.PLACEHOLDER)


def _drop_placeholders(tree, placeholder):
    if isinstance(tree, Mapping):
        kept = {k: _drop_placeholders(v, placeholder) for k, v in tree.items() if v is not placeholder}
        return {k: v for k, v in kept.items() if not (isinstance(v, dict) and not v)}
    return tree


def _zarr_leaf(path, name: ParamPath):
    """The TensorStore array of one parameter (this layout keeps each as its own zarr3 array);
    None for other layouts, e.g. the OCDBT directories that older training exports wrote."""
    import tensorstore as ts  # heavy, and only this direct read needs it

    leaf = location(path) / PARAMS_DIR / "state" / ".".join(name)
    if not isinstance(leaf, Path) or not (leaf / "zarr.json").exists():
        return None
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(leaf)}}, open=True).result()


def read_param(path, name: ParamPath, meta=None) -> np.ndarray:
    """One parameter as a host numpy array (the rest of the checkpoint is not read)."""
    import jax  # on first use (see the module docstring)

    arr = _zarr_leaf(path, name)
    if arr is not None:
        return np.asarray(arr.read().result())
    shape, dtype = (meta or param_metadata(path))[name]
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    tree = load_params(path, _nest(name, jax.ShapeDtypeStruct(shape, dtype, sharding=cpu)))
    for k in name:
        tree = tree[k]
    return np.asarray(tree)


def iter_layers(path, name: ParamPath, meta=None) -> Iterator[np.ndarray]:
    """The slices ``a[0], a[1], ...`` of a stacked parameter, read one at a time (chunks are split
    by layer first, so this reads each byte once); other layouts fall back to the whole array."""
    arr = _zarr_leaf(path, name)
    if arr is None:
        yield from read_param(path, name, meta)
        return
    for i in range(arr.shape[0]):
        yield np.asarray(arr[i].read().result())
