"""PyTorch checkpoints in and out: stream a PyTorch MuFun checkpoint into a model directory
(:mod:`mufun_jax.checkpoint` owns that layout), and export a model directory back to the released
combined HF layout.

Both directions stream: one torch tensor is read at a time and one stacked parameter is built at
a time (:func:`stream_torch_params`, which :func:`mufun_jax.loading.load_model` also uses to
load a PyTorch directory straight onto devices); export writes safetensors shards tensor by tensor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from mufun_jax import checkpoint
from mufun_jax.config import MuFunConfig
from mufun_jax.convert import (COMBINED_PREFIX, COMPONENTS, FLAX_ROOT, Path as FlaxPath, Rule, get_params,
                               normalize_keys, rules)
from mufun_jax.errors import CheckpointError
from mufun_jax.models import MuFun
from mufun_jax.models.connector import Connector
from mufun_jax.torch_files import open_folder, plan_shards, write_safetensors_shards

log = logging.getLogger(__name__)


def np_dtype(name: str):
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
        return cfg, _checked(cfg, {c: ComponentSource(index, COMBINED_PREFIX[c]) for c in COMPONENTS}, src), layout
    return cfg, _checked(cfg, {"whisper": ComponentSource(open_folder(src / "vision_tower")),
                               "connector": ComponentSource(open_folder(src / "connector")),
                               "qwen3": ComponentSource(open_folder(src / "language_model"))}, src), layout


def open_parts(whisper: str | Path, qwen3: str | Path, connector_type: str, **cfg_kw) -> tuple[MuFunConfig, dict]:
    """Plain HF Whisper + HF Qwen3 folders (training from scratch); the connector is initialised later."""
    w = _read_json(Path(whisper) / "config.json", "the Whisper config.json")
    q = _read_json(Path(qwen3) / "config.json", "the Qwen3 config.json")
    if w.get("model_type") != "whisper":
        raise CheckpointError(f"{whisper}/config.json: model_type={w.get('model_type')!r}, expected 'whisper'")
    if q.get("model_type") != "qwen3":
        raise CheckpointError(f"{qwen3}/config.json: model_type={q.get('model_type')!r}, expected 'qwen3'")
    cfg = MuFunConfig.from_hf_parts(w, q, connector_type=connector_type, **cfg_kw)
    return cfg, _checked(cfg, {"whisper": ComponentSource(open_folder(whisper)),
                               "qwen3": ComponentSource(open_folder(qwen3))}, f"{whisper} + {qwen3}")


def _checked(cfg: MuFunConfig, sources: dict, where) -> dict:
    """Every tensor the config needs is there, and nothing else: checked before anything is read."""
    for comp, source in sources.items():
        _check_keys(comp, source, cfg, str(getattr(source.index, "where", where)))
    return sources


# -- import --------------------------------------------------------------------------------


def torch_shape(rule: Rule, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    s = flax_shape if rule.layers is None else flax_shape[1:]
    return tuple(reversed(s)) if rule.kind in ("linear", "conv") else tuple(s)


def expected_shapes(cfg: MuFunConfig) -> dict[FlaxPath, tuple[int, ...]]:
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


@contextlib.contextmanager
def atomic_dir(dst: Path, overwrite: bool):
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
        raise


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled)


def stream_torch_params(cfg: MuFunConfig, sources: dict[str, ComponentSource], *, dtype=None,
                        fill: dict[FlaxPath, np.ndarray] | None = None) -> Iterator[tuple[FlaxPath, np.ndarray]]:
    """The one PyTorch -> Flax streaming reader: ``(flax path, host array)`` per parameter, in the
    mapping table's order, one stacked parameter built at a time (layer ``i + 1`` is read on a
    thread while layer ``i`` is converted straight into its slice). Shapes are checked against
    ``cfg`` tensor by tensor. ``dtype`` (numpy) converts on the way; ``fill`` gives the parameters
    of components that have no source (a fresh connector)."""
    shapes = expected_shapes(cfg)
    for comp in COMPONENTS:
        for rule in rules(cfg, comp):
            path = (FLAX_ROOT[comp],) + rule.path
            if comp not in sources:
                a = (fill or {})[rule.path]
                yield path, (a if dtype is None else a.astype(dtype))
                continue
            yield path, _read_rule(sources[comp], rule, shapes[path], dtype)


def _read_rule(source: ComponentSource, rule: Rule, flax_shape: tuple, dtype) -> np.ndarray:
    want = torch_shape(rule, flax_shape)
    stored_keys = [source.key_map[k] for k in rule.torch_keys()]
    for stored in stored_keys:
        got = tuple(source.shape(stored))
        if got != want:
            raise CheckpointError(f"{source.where(stored)}: tensor {stored!r} has shape {got}, but the config "
                                  f"needs {want}")
    out = None
    for i, (stored, t) in enumerate(zip(stored_keys, _prefetch(source.read, stored_keys))):
        if dtype is not None:
            t = t.astype(dtype, copy=False)
        if rule.layers is None:
            return rule.to_flax(t)
        if out is None:  # the stacked array; each layer is converted straight into its slice
            out = np.empty((rule.layers,) + tuple(flax_shape[1:]), t.dtype)
        if t.dtype != out.dtype:
            raise CheckpointError(f"{source.where(stored)}: tensor {stored!r} is {t.dtype} but layer 0 was "
                                  f"{out.dtype}; use --dtype to convert")
        rule.to_flax(t, out[i])
    return out


def import_checkpoint(dst: str | Path, src: str | Path | None = None, *, whisper=None, qwen3=None,
                      connector_type: str | None = None, taps=None, seed: int = 0, dtype: str = "keep",
                      overwrite: bool = False, progress: bool = True) -> MuFunConfig:
    """Convert a PyTorch MuFun checkpoint (combined or per-component folders), or plain HF
    Whisper + Qwen3 checkpoints plus a freshly initialised connector, into a model directory."""
    target = np_dtype(dtype)
    fill = {}
    if src is not None:
        if whisper or qwen3:
            raise ValueError("give either SRC or --whisper/--qwen3, not both")
        cfg, sources, layout = open_source(src)
        tokenizer_dir = Path(src)
    else:
        missing = [flag for flag, v in (("--whisper", whisper), ("--qwen3", qwen3), ("--connector", connector_type))
                   if not v]
        if missing:
            raise ValueError(f"importing from parts needs {' and '.join(missing)} too: a MuFun model directory "
                             "always holds the whole model (encoder, connector and LLM), which is what training "
                             "and inference load. Give --whisper W --qwen3 Q --connector blp_4i_2x; the connector "
                             "is initialised fresh (--seed)")
        cfg, sources = open_parts(whisper, qwen3, connector_type, **({} if taps is None else {"taps": tuple(taps)}))
        layout, tokenizer_dir = "parts", Path(qwen3)
        fill = _init_connector(cfg, seed)
    shapes = expected_shapes(cfg)
    total = _total_bytes(cfg, shapes, sources, target)
    n_tensors = sum(len(rule.torch_keys()) for comp in COMPONENTS for rule in rules(cfg, comp))

    def tracked():
        done = 0
        with _progress(total, "import", progress) as bar:
            for path, a in stream_torch_params(cfg, sources, dtype=target, fill=fill):
                done += len(_rule_of(cfg, path).torch_keys())
                bar.set_postfix_str(f"{done}/{n_tensors} tensors", refresh=False)
                bar.update(a.nbytes)
                yield path, a

    checkpoint.save_model(dst, cfg, tracked(), tokenizer_dir=tokenizer_dir, overwrite=overwrite)
    log.info("imported %s checkpoint into %s", layout, dst)
    return cfg


def _rule_of(cfg: MuFunConfig, path: FlaxPath) -> Rule:
    comp = next(c for c in COMPONENTS if FLAX_ROOT[c] == path[0])
    return next(r for r in rules(cfg, comp) if r.path == path[1:])


def _prefetch(read: Callable[[str], np.ndarray], keys: list[str]) -> Iterator[np.ndarray]:
    """``read(k)`` for each key in order, one read ahead on a background thread."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, keys[0]) if keys else None
        for i in range(len(keys)):
            current = pending.result()
            pending = pool.submit(read, keys[i + 1]) if i + 1 < len(keys) else None
            yield current
            del current


def _init_connector(cfg: MuFunConfig, seed: int) -> dict[FlaxPath, np.ndarray]:
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


def export_checkpoint(src: str | Path, dst: str | Path, *, dtype: str = "keep", max_shard_gb: float = 5.0,
                      overwrite: bool = False, progress: bool = True) -> None:
    """Converted directory -> the released combined HF layout: same key names, TinyLLaVA
    ``config.json``, sharded safetensors with an index, tokenizer files."""
    src = Path(src)
    cfg = checkpoint.load_config(src)
    meta = checkpoint.param_metadata(src)
    target = np_dtype(dtype)
    entries = []
    for comp in COMPONENTS:
        for rule in rules(cfg, comp):
            path = (FLAX_ROOT[comp],) + rule.path
            if path not in meta:
                raise CheckpointError(f"{src}: parameter {'.'.join(path)} missing from the checkpoint")
            shape, dt = meta[path]
            for key in rule.torch_keys():
                entries.append((COMBINED_PREFIX[comp] + key, torch_shape(rule, shape), target or dt))
    shards = plan_shards(entries, int(max_shard_gb * (1 << 30)))

    def tensors():
        for comp in COMPONENTS:
            for rule in rules(cfg, comp):
                name = (FLAX_ROOT[comp],) + rule.path
                parts = ([checkpoint.read_param(src, name, meta)] if rule.layers is None
                         else checkpoint.iter_layers(src, name, meta))
                for key, part in zip(rule.torch_keys(), parts):
                    t = rule.to_torch(part)
                    yield COMBINED_PREFIX[comp] + key, (t if target is None else t.astype(target))

    total = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in entries)
    with atomic_dir(Path(dst), overwrite) as tmp, _progress(total, "export", progress) as bar:
        write_safetensors_shards(tmp, shards, tensors(), bar)
        (tmp / "config.json").write_text(json.dumps(cfg.to_tinyllava(), indent=2))
        for name in checkpoint.TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
