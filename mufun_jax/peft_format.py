"""A LoRA training run as a PEFT adapter, and PEFT adapters onto our model.

PEFT's format is what the PyTorch side loads (``PeftModel.from_pretrained`` on the TinyLLaVA MuFun).
Keys are the released checkpoint's module names, one tensor per layer, torch orientation:
``base_model.model.<module>.lora_A.weight`` (r, in) is our ``lora_a[i].T``, ``lora_B`` (out, r) our
``lora_b[i].T``. ``target_modules`` is a regex because PEFT full-matches a string against module names
and Whisper also has q/k/v_proj. Fully trained modules go where PEFT puts ``modules_to_save``, listed
by the leaf modules that own the trained tensors, so PEFT never wraps a container whose forward is not
called (Whisper's ``layers``) nor the frozen position table. Our base config rides in the safetensors
metadata: PEFT ignores it there, while unknown keys in ``adapter_config.json`` make it warn.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from mufun_jax.config import MuFunConfig
from mufun_jax.convert import COMBINED_PREFIX, COMPONENTS, FLAX_ROOT, rules
from mufun_jax.torch_files import CheckpointError, SafetensorsFile, plan_shards, write_safetensors_shards

log = logging.getLogger(__name__)

WEIGHTS_NAME, CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the base model's module names
META_CONFIG = "mufun_config"
ARCH_KEYS = ("whisper", "qwen3", "connector_type", "taps", "pool_stride")  # what the weights depend on
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {}}


def _by_path(cfg: MuFunConfig) -> dict:
    """Our full parameter path -> (its combined-checkpoint prefix, its mapping rule)."""
    return {(FLAX_ROOT[c],) + r.path: (COMBINED_PREFIX[c], r) for c in COMPONENTS for r in rules(cfg, c)}


# -- export ---------------------------------------------------------------------------------------


def adapter_tensors(params: dict, cfg: MuFunConfig) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """A run's trainable parameters (nested: LoRA factors and fully trained tensors) -> (PEFT state
    dict, adapted module names with ``{i}`` for the layer, ``modules_to_save`` module names)."""
    index = _by_path(cfg)
    out, targets, full = {}, set(), set()
    for path, a in flatten_dict(params).items():
        lora = path[-1] in ("lora_a", "lora_b")
        owner = path[:-1] + ("kernel",) if lora else path
        if owner not in index:
            raise ValueError(f"trained parameter {'.'.join(path)} has no name in the PyTorch layout")
        prefix, rule = index[owner]
        a = np.asarray(a)
        for i, key in enumerate(rule.torch_keys()):
            part = a if rule.layers is None else a[i]
            module = (prefix + key).rsplit(".", 1)[0]
            if lora:
                side = "A" if path[-1] == "lora_a" else "B"
                out[f"{PREFIX}{module}.lora_{side}.weight"] = np.ascontiguousarray(part.T)
                targets.add(prefix + rule.key.rsplit(".", 1)[0])
            else:
                out[PREFIX + prefix + key] = rule.to_torch(part)
                full.add(module)
    return out, sorted(targets), sorted(full)


def target_regex(templates: list[str]) -> str:
    """``a.layers.{i}.self_attn.q_proj`` ... -> ``a\\.layers\\.\\d+\\.self_attn\\.(?:q_proj|...)``."""
    groups: dict[str, list[str]] = {}
    for t in templates:
        parent, _, leaf = t.rpartition(".")
        groups.setdefault(parent, []).append(re.escape(leaf))
    esc = lambda s: r"\d+".join(re.escape(p) for p in s.split("{i}"))
    return "|".join(f"{esc(p)}\\.(?:{'|'.join(leaves)})" for p, leaves in sorted(groups.items()))


def peft_config(lora, targets: list[str], full: list[str], base: str | None) -> dict:
    """``adapter_config.json`` for peft 0.21's ``LoraConfig`` (defaults written out where they matter)."""
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else float(lora.alpha)
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "revision": None,
            "inference_mode": True, "r": lora.rank, "lora_alpha": alpha, "lora_dropout": lora.dropout,
            "target_modules": target_regex(targets), "exclude_modules": None, "modules_to_save": full or None,
            "bias": "none", "use_rslora": False, "init_lora_weights": True, "layers_to_transform": None,
            "layers_pattern": None, **UNSUPPORTED}


def restore_trainable(src):
    """(TrainConfig, step, trainable params, Trainer) of a LoRA run's newest committed checkpoint; only
    the trainable parameters are read, not the optimizer state."""
    import jax
    import orbax.checkpoint as ocp

    from mufun_jax.checkpoint import location
    from mufun_jax.sharding import make_mesh
    from mufun_jax.train_config import TrainConfig
    from mufun_jax.train_lib import Trainer

    src = location(src)
    if not (src / "train_config.json").exists():
        raise CheckpointError(f"{src}: not a training run directory (no train_config.json): give train.py's output_dir")
    d = json.loads((src / "train_config.json").read_text())
    init_from = d.pop("init_from", None)  # the saved model section is the whole architecture; init_from may be gone
    cfg = TrainConfig.from_dict(d)
    cfg.init_from = init_from
    if not cfg.run.lora_modules:
        raise ValueError(f"{src}: the run trains no module with LoRA (trainable={cfg.trainable}), so there is no "
                         f"adapter: its trained model is {src / 'model'}; `convert_weights.py export {src / 'model'} "
                         f"DST` writes it in the PyTorch layout")
    ckpts = src / "checkpoints"
    step = max(ocp.utils.checkpoint_steps(ckpts) if ckpts.is_dir() else [], default=None)  # committed ones only
    if step is None:
        raise CheckpointError(f"{ckpts}: no committed checkpoint; the run has not saved one yet (see save_every)")
    trainer = Trainer(cfg, cfg.model_config(), make_mesh(1, -1, 1))
    abstract = trainer.abstract_checkpoint()["params"]
    restore = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype),
                           abstract)
    ckptr = ocp.PyTreeCheckpointer()
    try:
        params = ckptr.restore(ckpts / str(step) / "state", args=ocp.args.PyTreeRestore(
            item={"params": abstract}, restore_args={"params": restore}, partial_restore=True))["params"]
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{ckpts / str(step)}: cannot read the trainable parameters that "
                              f"{src / 'train_config.json'} describes: {e}") from e
    finally:
        ckptr.close()
    return cfg, step, params, trainer


def export_adapter(src, dst, *, merge: bool = False, dtype: str = "keep", overwrite: bool = False,
                   max_shard_gb: float = 5.0, progress: bool = True) -> None:
    """A LoRA run's newest checkpoint -> a PEFT adapter directory, or (``merge``) the whole model in
    the released PyTorch layout with the adapters merged and the fully trained modules in place."""
    from mufun_jax import weights

    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    cfg, step, params, trainer = restore_trainable(src)
    if merge:
        _export_merged(cfg, trainer, params, dst, dtype=dtype, max_shard_gb=max_shard_gb, overwrite=overwrite,
                       progress=progress)
        log.info("wrote step %d of %s with its adapters merged to %s", step, src, dst)
        return
    if cfg.quantize:
        log.warning("the run trained its adapters on an %s-quantised base; on the float base their outputs differ "
                    "slightly (--merge merges them into the dequantised base, as train.py's own export does)",
                    cfg.quantize)
    tensors, targets, full = adapter_tensors(params, trainer.model_cfg)
    target = weights.np_dtype(dtype)
    arrays = {k: tensors[k] if target is None else tensors[k].astype(target) for k in sorted(tensors)}
    meta = {META_CONFIG: json.dumps(trainer.model_cfg.to_dict()),
            "mufun_run": json.dumps({"step": step, "trainable": cfg.trainable, "quantize": cfg.quantize})}
    with weights.atomic_dir(dst, overwrite) as tmp:
        shards = plan_shards([(k, a.shape, a.dtype) for k, a in arrays.items()], 1 << 62)  # PEFT reads one file
        write_safetensors_shards(tmp, shards, iter(arrays.items()), name=WEIGHTS_NAME.removesuffix(".safetensors"),
                                 metadata=meta)
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config(cfg.lora, targets, full, cfg.init_from), indent=2))
    log.info("wrote the step-%d adapter of %s to %s: LoRA on %d layers%s", step, src, dst,
             sum(k.endswith(".lora_A.weight") for k in arrays), f", modules_to_save {full}" if full else "")


def _export_merged(cfg, trainer, params, dst: Path, **kw) -> None:
    """Rebuild the frozen base exactly as a resumed run does (``init_from`` or the seed), merge through
    train.py's own export, then write the released layout with ``convert_weights.py export``'s writer."""
    import jax

    from mufun_jax import checkpoint, weights
    from mufun_jax.train_lib import export_model, load_init_params

    base = load_init_params(trainer, cfg.init_from) if cfg.init_from else None
    frozen = trainer.init_frozen(jax.random.key(cfg.seed), base)
    del base
    tmp = dst.resolve().parent / f".{dst.name}.merged-{uuid.uuid4().hex[:8]}"
    try:
        export_model({"params": params, "frozen": frozen}, trainer.model_cfg, None, tmp, trainer.run)
        tok = cfg.data.tokenizer or cfg.init_from
        for name in checkpoint.TOKENIZER_FILES if tok else ():
            if (Path(tok) / name).exists():
                shutil.copy2(Path(tok) / name, tmp / name)
        weights.export_checkpoint(tmp, dst, **kw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    import jax
    import jax.numpy as jnp

    conf, tensors, base = read_adapter(adapter_dir)
    check_base(base, cfg, adapter_dir)
    r = int(conf["r"])
    scaling = conf["lora_alpha"] / (r ** 0.5 if conf.get("use_rslora") else r)
    names = {prefix + key: (path, rule, None if rule.layers is None else i)
             for path, (prefix, rule) in _by_path(cfg).items() for i, key in enumerate(rule.torch_keys())}
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
    from flax import nnx

    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, merge_adapter(nnx.to_pure_dict(state), model.cfg, adapter_dir))
    nnx.update(model, state)
    return model
