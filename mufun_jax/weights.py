"""The converted-weights directory: import PyTorch MuFun checkpoints into it, export back,
and load it.

Layout of a converted directory::

    DST/mufun_config.json    MuFunConfig.to_dict()
    DST/params/              Orbax checkpoint: {"encoder": ..., "connector": ..., "language_model": ...},
                             layers stacked on a leading axis, as the model holds them
    DST/<tokenizer files>    copied from the source when present

Import and export stream: one torch tensor is read at a time, one stacked parameter is
built at a time and handed to Orbax's partial save, and export writes safetensors shards
tensor by tensor. Outputs are written to a temporary sibling directory and renamed into
place only when complete, so an interrupted run never leaves something that looks valid.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mufun_jax.config import MuFunConfig
from mufun_jax.convert import (COMBINED_PREFIX, COMPONENTS, FLAX_ROOT, Path as FlaxPath, Rule, normalize_keys,
                               rules)
from mufun_jax.torch_files import CheckpointError, open_folder, plan_shards, write_safetensors_shards

log = logging.getLogger(__name__)

CONFIG_NAME = "mufun_config.json"
PARAMS_DIR = "params"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja")


def _np_dtype(name: str):
    import ml_dtypes

    if name == "keep":
        return None
    if name == "float32":
        return np.dtype(np.float32)
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    raise ValueError(f"--dtype {name!r}: expected keep, float32 or bfloat16")


def _read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


# -- sources -----------------------------------------------------------------------------


class ComponentSource:
    """The torch tensors of one component, under that component's own key names."""

    def __init__(self, index, prefix: str = ""):
        self.index, self.prefix = index, prefix
        self.keys = [k[len(prefix):] for k in index.keys() if k.startswith(prefix)]

    def shape(self, key: str):
        return self.index.shape(self.prefix + key)

    def read(self, key: str) -> np.ndarray:
        return self.index.read(self.prefix + key)

    def itemsize(self, key: str) -> int:
        return self.index.itemsize(self.prefix + key)

    def where(self, key: str) -> str:
        return str(self.index.file_of(self.prefix + key))


def detect_layout(src: Path) -> str:
    """'combined' (released checkpoint) or 'components' (MuFun training's per-part folders)."""
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    if all((src / d).is_dir() for d in ("language_model", "vision_tower", "connector")):
        return "components"
    cfg = _read_json(src / "config.json", "the MuFun config.json")
    if cfg.get("model_type") != "tinyllava":
        raise CheckpointError(
            f"{src / 'config.json'}: model_type={cfg.get('model_type')!r} is not a MuFun (tinyllava) config; for "
            "plain HF Whisper + Qwen3 checkpoints use `import --whisper W --qwen3 Q --connector TYPE DST`")
    return "combined"


def open_source(src: str | Path) -> tuple[MuFunConfig, dict[str, ComponentSource], str]:
    src = Path(src)
    layout = detect_layout(src)
    top = _read_json(src / "config.json", "the MuFun config.json")
    try:
        cfg = MuFunConfig.from_tinyllava(top)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{src / 'config.json'}: {e}") from e
    if layout == "combined":
        index = open_folder(src)
        unknown = [k for k in index.keys() if not k.startswith(tuple(COMBINED_PREFIX.values()))]
        if unknown:
            raise CheckpointError(f"{src}: {len(unknown)} tensors belong to no MuFun component, e.g. {unknown[:3]}")
        return cfg, {c: ComponentSource(index, COMBINED_PREFIX[c]) for c in COMPONENTS}, layout
    return cfg, {"whisper": ComponentSource(open_folder(src / "vision_tower")),
                 "connector": ComponentSource(open_folder(src / "connector")),
                 "qwen3": ComponentSource(open_folder(src / "language_model"))}, layout


def open_parts(whisper: str | Path, qwen3: str | Path, connector_type: str, **cfg_kw) -> tuple[MuFunConfig, dict]:
    """Plain HF Whisper + HF Qwen3 folders (training from scratch); the connector is initialised later."""
    w = _read_json(Path(whisper) / "config.json", "the Whisper config.json")
    q = _read_json(Path(qwen3) / "config.json", "the Qwen3 config.json")
    if w.get("model_type") != "whisper":
        raise CheckpointError(f"{whisper}/config.json: model_type={w.get('model_type')!r}, expected 'whisper'")
    if q.get("model_type") != "qwen3":
        raise CheckpointError(f"{qwen3}/config.json: model_type={q.get('model_type')!r}, expected 'qwen3'")
    cfg = MuFunConfig.from_hf_parts(w, q, connector_type=connector_type, **cfg_kw)
    return cfg, {"whisper": ComponentSource(open_folder(whisper)), "qwen3": ComponentSource(open_folder(qwen3))}


# -- import --------------------------------------------------------------------------------


def _torch_shape(rule: Rule, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    s = flax_shape if rule.layers is None else flax_shape[1:]
    return tuple(reversed(s)) if rule.kind in ("linear", "conv") else tuple(s)


def _expected_shapes(cfg: MuFunConfig) -> dict[FlaxPath, tuple[int, ...]]:
    from flax import nnx

    from mufun_jax.models import MuFun

    model = nnx.eval_shape(lambda: MuFun(cfg, rngs=nnx.Rngs(0)))
    return {tuple(str(p) for p in path): tuple(v.shape) for path, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Variable)}


def _check_keys(comp: str, source: ComponentSource, cfg: MuFunConfig, where: str) -> None:
    present = normalize_keys({k: k for k in source.keys}, comp)
    wanted = {k for r in rules(cfg, comp) for k in r.torch_keys()}
    if comp == "qwen3" and cfg.qwen3.tie_word_embeddings:
        present.pop("lm_head.weight", None)
    missing = sorted(wanted - set(present))
    extra = sorted(set(present) - wanted)
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} {comp} tensors missing, e.g. {missing[:5]}")
    if extra:
        raise CheckpointError(f"{where}: {len(extra)} unexpected {comp} tensors, e.g. {extra[:5]}; does the "
                              "checkpoint match its config?")
    source.key_map = dict(present)  # normalised key -> stored key


def _nest(path: FlaxPath, value) -> dict:
    out = value
    for p in reversed(path):
        out = {p: out}
    return out


@contextlib.contextmanager
def _atomic_dir(dst: Path, overwrite: bool):
    """Yield a fresh temporary sibling of ``dst``; rename it to ``dst`` only on success."""
    dst = dst.resolve()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(Path(str(tmp / PARAMS_DIR) + ".partial_save"), ignore_errors=True)
        raise


def _orbax_context():
    """Orbax save options for streaming. Measured on a 2 GB leaf: the defaults (OCDBT,
    defensive host copy) add ~4.2 GB of peak RSS; plain zarr3 per leaf, no host copy and
    16 MB chunks add ~0.45 GB, and write at over 1 GB/s. Weights do not compress."""
    import orbax.checkpoint.experimental.v1 as ocp

    ctx = ocp.Context()
    ctx.array.saving.use_ocdbt = False
    ctx.array.saving.use_compression = False
    ctx.array.saving.storage_options.chunk_byte_size = 16 << 20
    ctx.array.saving.storage_options.shard_axes = (0,)  # chunks split by layer first: export reads one layer
    ctx.memory.deepcopy_host_arrays = False
    return ctx


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them in per-thread arenas, which after a
    few 100 MB tensors read on TensorStore's threads added ~1.5 GB to the converter's peak RSS)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled)


def write_params(dst_params: Path, cfg: MuFunConfig, shapes: dict, produce: Callable[[str, Rule, tuple], np.ndarray],
                 total_bytes: int, progress: bool = True) -> None:
    """Stream every parameter through ``produce(component, rule, flax_shape)`` into Orbax."""
    import orbax.checkpoint.experimental.v1 as ocp

    table = [(comp, rule) for comp in COMPONENTS for rule in rules(cfg, comp)]
    n_tensors = sum(len(rule.torch_keys()) for _, rule in table)
    done = 0
    with _orbax_context(), _progress(total_bytes, "import", progress) as bar:
        for comp, rule in table:
            path = (FLAX_ROOT[comp],) + rule.path
            a = produce(comp, rule, shapes[path])
            nbytes = a.nbytes
            ocp.partial.save(dst_params, _nest(path, a))
            del a
            _release_freed_memory()
            done += len(rule.torch_keys())
            bar.set_postfix_str(f"{done}/{n_tensors} tensors", refresh=False)
            bar.update(nbytes)
        ocp.partial.finalize(dst_params)


def import_checkpoint(dst: str | Path, src: str | Path | None = None, *, whisper=None, qwen3=None,
                      connector_type: str | None = None, taps=None, seed: int = 0, dtype: str = "keep", overwrite: bool = False,
                      progress: bool = True) -> MuFunConfig:
    """Convert a PyTorch MuFun checkpoint (combined or per-component folders), or plain HF
    Whisper + Qwen3 checkpoints plus a freshly initialised connector, into ``dst``."""
    target = _np_dtype(dtype)
    init_connector = {}
    if src is not None:
        if whisper or qwen3:
            raise ValueError("give either SRC or --whisper/--qwen3, not both")
        cfg, sources, layout = open_source(src)
        tokenizer_dir = Path(src)
    else:
        if not (whisper and qwen3 and connector_type):
            raise ValueError("importing from parts needs --whisper, --qwen3 and --connector")
        cfg, sources = open_parts(whisper, qwen3, connector_type, **({} if taps is None else {"taps": tuple(taps)}))
        layout, tokenizer_dir = "parts", Path(qwen3)
        init_connector = _init_connector(cfg, seed)
    for comp, source in sources.items():
        _check_keys(comp, source, cfg, str(getattr(source.index, "where", src)))

    def produce(comp, rule, flax_shape):
        if comp not in sources:
            a = init_connector[rule.path]
            return a if target is None else a.astype(target)
        source = sources[comp]
        want = _torch_shape(rule, flax_shape)
        stored_keys = [source.key_map[k] for k in rule.torch_keys()]
        for stored in stored_keys:
            got = tuple(source.shape(stored))
            if got != want:
                raise CheckpointError(f"{source.where(stored)}: tensor {stored!r} has shape {got}, but the config "
                                      f"needs {want}")
        out = None
        # Read layer i+1 on a thread while layer i is converted: file reads and numpy copies release the GIL.
        for i, (stored, t) in enumerate(zip(stored_keys, _prefetch(source.read, stored_keys))):
            if target is not None:
                t = t.astype(target, copy=False)
            if rule.layers is None:
                return rule.to_flax(t)
            if out is None:  # the stacked array; each layer is converted straight into its slice
                out = np.empty((rule.layers,) + tuple(flax_shape[1:]), t.dtype)
            if t.dtype != out.dtype:
                raise CheckpointError(f"{source.where(stored)}: tensor {stored!r} is {t.dtype} but layer 0 was "
                                      f"{out.dtype}; use --dtype to convert")
            rule.to_flax(t, out[i])
        return out

    shapes = _expected_shapes(cfg)
    total = _total_bytes(cfg, shapes, sources, target)
    dst = Path(dst)
    with _atomic_dir(dst, overwrite) as tmp:
        write_params(tmp / PARAMS_DIR, cfg, shapes, produce, total, progress)
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2))
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copy2(tokenizer_dir / name, tmp / name)
    log.info("imported %s checkpoint into %s", layout, dst)
    return cfg


def _prefetch(read: Callable[[str], np.ndarray], keys: list[str]) -> Iterator[np.ndarray]:
    """``read(k)`` for each key in order, one read ahead on a background thread."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, keys[0]) if keys else None
        for i in range(len(keys)):
            current = pending.result()
            pending = pool.submit(read, keys[i + 1]) if i + 1 < len(keys) else None
            yield current
            del current


def _init_connector(cfg: MuFunConfig, seed: int) -> dict[FlaxPath, np.ndarray]:
    from flax import nnx

    from mufun_jax.convert import get_params
    from mufun_jax.models.connector import Connector

    return get_params(Connector(cfg.connector, rngs=nnx.Rngs(seed)))


def _total_bytes(cfg, shapes, sources, target) -> int:
    total = 0
    for comp in COMPONENTS:
        for rule in rules(cfg, comp):
            n = int(np.prod(shapes[(FLAX_ROOT[comp],) + rule.path]))
            if target is not None:
                total += n * target.itemsize
            elif comp in sources:
                total += n * sources[comp].itemsize(sources[comp].key_map[rule.torch_keys()[0]])
            else:
                total += n * 4
    return total


# -- loading and export --------------------------------------------------------------------


def _location(path: str | Path):
    """A local path made absolute (Orbax needs it), or a ``gs://...`` URL as an ``epath.Path``."""
    if "://" in str(path):
        from etils import epath

        return epath.Path(str(path))
    return Path(path).resolve()


def load_config(path: str | Path) -> MuFunConfig:
    path = _location(path)
    if not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path}: not a converted MuFun directory (no {PARAMS_DIR}/); run convert_weights.py "
                              "import first")
    return MuFunConfig.from_dict(_read_json(path / CONFIG_NAME, "the converted MuFun config"))


def param_metadata(path: str | Path) -> dict[FlaxPath, tuple[tuple[int, ...], np.dtype]]:
    import jax
    import orbax.checkpoint.experimental.v1 as ocp

    meta = ocp.metadata(_location(path) / PARAMS_DIR).metadata
    flat = jax.tree_util.tree_flatten_with_path(meta, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {tuple(k.key for k in kp): (tuple(v.shape), np.dtype(v.dtype)) for kp, v in flat}


def _restore(path: str | Path, meta, leaf) -> dict:
    """Restore from Orbax with ``leaf(path, shape, dtype)`` giving each leaf's abstract value
    (``ocp.PLACEHOLDER`` skips that parameter)."""
    import orbax.checkpoint.experimental.v1 as ocp

    abstract: dict = {}
    for p, (shape, dtype) in meta.items():
        node = abstract
        for k in p[:-1]:
            node = node.setdefault(k, {})
        node[p[-1]] = leaf(p, shape, dtype)
    return ocp.load(_location(path) / PARAMS_DIR, abstract)


def _cpu():
    import jax

    return jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])


def _zarr_leaf(path: str | Path, name: FlaxPath):
    """The TensorStore array of one parameter when the checkpoint keeps each leaf as its own zarr3
    array (what the converter writes); None for other layouts (e.g. OCDBT)."""
    import tensorstore as ts

    leaf = Path(path) / PARAMS_DIR / "state" / ".".join(name)
    if not (leaf / "zarr.json").exists():
        return None
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(leaf)}}, open=True).result()


def read_param(path: str | Path, name: FlaxPath, meta=None) -> np.ndarray:
    """One parameter as a host numpy array (the rest of the checkpoint is not read)."""
    import jax
    import orbax.checkpoint.experimental.v1 as ocp

    arr = _zarr_leaf(path, name)
    if arr is not None:
        return np.asarray(arr.read().result())
    cpu = _cpu()
    tree = _restore(path, meta or param_metadata(path), lambda p, shape, dtype: jax.ShapeDtypeStruct(
        shape, dtype, sharding=cpu) if p == name else ocp.PLACEHOLDER)
    for k in name:
        tree = tree[k]
    return np.asarray(tree)


def iter_layers(path: str | Path, name: FlaxPath, meta) -> Iterator[np.ndarray]:
    """The slices ``a[0], a[1], ...`` of a stacked parameter, read one at a time (chunks are split
    by layer first, so this reads each byte once); other layouts fall back to the whole array."""
    arr = _zarr_leaf(path, name)
    if arr is None:
        yield from read_param(path, name, meta)
        return
    for i in range(arr.shape[0]):
        yield np.asarray(arr[i].read().result())


def load_params(path: str | Path, shardings=None):
    """The whole parameter tree (nested dicts), optionally placed with ``shardings`` (same tree
    of ``jax.sharding.Sharding``); for small models and for sharded restore."""
    import jax

    cpu = _cpu()

    def leaf(p, shape, dtype):
        s = shardings
        for k in p if s is not None else ():
            s = s[k]
        return jax.ShapeDtypeStruct(shape, dtype, sharding=cpu if s is None else s)

    return _restore(path, param_metadata(path), leaf)


def export_checkpoint(src: str | Path, dst: str | Path, *, dtype: str = "keep", max_shard_gb: float = 5.0,
                      overwrite: bool = False, progress: bool = True) -> None:
    """Converted directory -> the released combined HF layout: same key names, TinyLLaVA
    ``config.json``, sharded safetensors with an index, tokenizer files."""
    src = Path(src)
    cfg = load_config(src)
    meta = param_metadata(src)
    target = _np_dtype(dtype)
    entries = []
    for comp in COMPONENTS:
        for rule in rules(cfg, comp):
            path = (FLAX_ROOT[comp],) + rule.path
            if path not in meta:
                raise CheckpointError(f"{src}: parameter {'.'.join(path)} missing from the checkpoint")
            shape, dt = meta[path]
            for key in rule.torch_keys():
                entries.append((COMBINED_PREFIX[comp] + key, _torch_shape(rule, shape), target or dt))
    shards = plan_shards(entries, int(max_shard_gb * (1 << 30)))

    def tensors():
        for comp in COMPONENTS:
            for rule in rules(cfg, comp):
                name = (FLAX_ROOT[comp],) + rule.path
                parts = [read_param(src, name, meta)] if rule.layers is None else iter_layers(src, name, meta)
                for key, part in zip(rule.torch_keys(), parts):
                    t = rule.to_torch(part)
                    yield COMBINED_PREFIX[comp] + key, (t if target is None else t.astype(target))

    total = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in entries)
    with _atomic_dir(Path(dst), overwrite) as tmp, _progress(total, "export", progress) as bar:
        write_safetensors_shards(tmp, shards, tensors(), bar)
        (tmp / "config.json").write_text(json.dumps(cfg.to_tinyllava(), indent=2))
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
