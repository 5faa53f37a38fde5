"""PEFT's LoRA adapter format, and PEFT adapters merged into our model.

PEFT's format is what the PyTorch side loads (``PeftModel.from_pretrained`` on the TinyLLaVA MuFun).
Keys are the released checkpoint's module names, one tensor per layer, torch orientation:
``base_model.model.<module>.lora_A.weight`` (r, in) is our ``lora_a[i].T``, ``lora_B`` (out, r) our
``lora_b[i].T``. ``target_modules`` is a regex because PEFT full-matches a string against module names
and Whisper also has q/k/v_proj. Fully trained modules go where PEFT puts ``modules_to_save``, listed
by the leaf modules that own the trained tensors, so PEFT never wraps a container whose forward is not
called (Whisper's ``layers``) nor the frozen position table. Our base config rides in the safetensors
metadata: PEFT ignores it there, while unknown keys in ``adapter_config.json`` make it warn.

This module defines the format and reads it (model loading merges adapters through
:func:`load_adapter`); writing a training run's adapters is on the training side, in
:mod:`mufun_jax.peft_export`.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from mufun_jax.config import MuFunConfig
from mufun_jax.convert import COMBINED_PREFIX, COMPONENTS, FLAX_ROOT, rules
from mufun_jax.errors import CheckpointError
from mufun_jax.torch_files import SafetensorsFile

log = logging.getLogger(__name__)

WEIGHTS_NAME, CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the base model's module names
META_CONFIG = "mufun_config"
ARCH_KEYS = ("whisper", "qwen3", "connector_type", "taps", "pool_stride")  # what the weights depend on
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {}}


def by_path(cfg: MuFunConfig) -> dict:
    """Our full parameter path -> (its combined-checkpoint prefix, its mapping rule)."""
    return {(FLAX_ROOT[c],) + r.path: (COMBINED_PREFIX[c], r) for c in COMPONENTS for r in rules(cfg, c)}


# -- import ---------------------------------------------------------------------------------------


def read_adapter(adapter_dir) -> tuple[dict, dict[str, np.ndarray], dict | None]:
    """(adapter_config.json, tensors, our base config dict or None) of a PEFT LoRA adapter directory."""
    d = Path(adapter_dir)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / name).exists():
            raise CheckpointError(f"{d}: not a PEFT adapter directory (no {name})")
    conf = json.loads((d / CONFIG_NAME).read_text())
    if conf.get("peft_type") != "LORA":
        raise ValueError(f"{d / CONFIG_NAME}: peft_type={conf.get('peft_type')!r}; only LORA adapters are supported")
    bad = {k: conf[k] for k, off in UNSUPPORTED.items() if conf.get(k, off) not in (off, None)}
    if bad:
        raise ValueError(f"{d / CONFIG_NAME}: unsupported LoRA options {bad} (plain LoRA only)")
    f = SafetensorsFile(d / WEIGHTS_NAME)
    base = f.metadata.get(META_CONFIG)
    return conf, {k: f.read(k) for k in f.keys()}, (json.loads(base) if base else None)


def check_base(base: dict | None, cfg: MuFunConfig, where) -> None:
    """A clear error, naming the differences, when the adapter's recorded base architecture is not ``cfg``'s."""
    if base is None:
        log.info("%s records no MuFun base config (not exported by us); only tensor shapes are checked", where)
        return
    want, have = (flatten_dict({k: c.to_dict()[k] for k in ARCH_KEYS}) for c in (MuFunConfig.from_dict(base), cfg))
    diffs = [f"{'.'.join(k)}: adapter {want.get(k)!r}, model {have.get(k)!r}"
             for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if diffs:
        raise ValueError(f"{where}: the adapter was trained on a different base model: {'; '.join(diffs)}")


def merge_adapter(params: dict, cfg: MuFunConfig, adapter_dir) -> dict:
    """``params`` (nested, our layout, float kernels) with a PEFT LoRA adapter merged in (``W + A B
    alpha / r``) and its ``modules_to_save`` tensors in place; a new tree."""
    conf, tensors, base = read_adapter(adapter_dir)
    check_base(base, cfg, adapter_dir)
    r = int(conf["r"])
    scaling = conf["lora_alpha"] / (r ** 0.5 if conf.get("use_rslora") else r)
    names = {prefix + key: (path, rule, None if rule.layers is None else i)
             for path, (prefix, rule) in by_path(cfg).items() for i, key in enumerate(rule.torch_keys())}
    lora, full, unknown = {}, {}, []
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", name)
        hit = names.get(m[1] + ".weight" if m else name)
        if hit is None or (m and hit[1].kind != "linear"):
            unknown.append(key)
        elif m:
            lora.setdefault(hit[0], {})[(hit[2], m[2])] = (key, t)
        else:
            full.setdefault(hit[0], []).append((hit[1], hit[2], key, t))
    if unknown:
        raise ValueError(f"{adapter_dir}: {len(unknown)} tensors match no parameter of this MuFun model, e.g. "
                         f"{sorted(unknown)[:5]}: is it an adapter of another model?")
    flat = flatten_dict(params)
    for path, parts in full.items():
        w = np.array(flat[path])
        for rule, i, key, t in parts:
            a = rule.to_flax(t)
            if a.shape != (w.shape if i is None else w.shape[1:]):
                raise ValueError(f"{adapter_dir}: {key} has shape {t.shape}; the model's tensor is "
                                 f"{rule.to_torch(w if i is None else w[i]).shape}")
            w[() if i is None else i] = a.astype(w.dtype)
        flat[path] = jax.device_put(w, getattr(flat[path], "sharding", None))
    for path, parts in lora.items():
        if path[:-1] + ("kernel_scale",) in flat:
            raise ValueError(f"{'.'.join(path)} is quantised: load the adapter onto a float model (quantise after)")
        w = flat[path]
        *lead, n_in, n_out = w.shape
        ab = {"A": np.zeros((*lead, n_in, r), np.float32), "B": np.zeros((*lead, r, n_out), np.float32)}
        for (i, side), (key, t) in parts.items():
            want = (r, n_in) if side == "A" else (n_out, r)
            if t.shape != want:
                raise ValueError(f"{adapter_dir}: {key} has shape {t.shape}; this model and r={r} need {want}")
            if (i, "B" if side == "A" else "A") not in parts:
                raise ValueError(f"{adapter_dir}: {key} has no lora_{'B' if side == 'A' else 'A'} partner")
            ab[side][() if i is None else i] = t.T
        delta = jnp.matmul(jnp.asarray(ab["A"]), jnp.asarray(ab["B"])) * scaling
        flat[path] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return unflatten_dict(flat)


def load_adapter(model, adapter_dir):
    """Merge a PEFT LoRA adapter (ours, or one trained with PEFT on the PyTorch MuFun) into a
    :class:`mufun_jax.models.MuFun`'s weights in place, for inference; returns the model."""
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, merge_adapter(nnx.to_pure_dict(state), model.cfg, adapter_dir))
    nnx.update(model, state)
    return model
