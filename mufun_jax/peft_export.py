"""A LoRA training run as a PEFT adapter: the training side of :mod:`mufun_jax.peft_format`.

``convert_weights.py export-adapter`` reads a run's newest committed checkpoint (its trainable
parameters only) and writes PEFT's adapter directory, or with ``--merge`` the whole model in the
released PyTorch layout with the adapters merged. It sits above the trainer (it rebuilds the
frozen base exactly as a resumed run does), so nothing on the loading side imports it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict

from mufun_jax import weights
from mufun_jax.checkpoint import TOKENIZER_FILES, location
from mufun_jax.config import MuFunConfig
from mufun_jax.errors import CheckpointError
from mufun_jax.peft_format import CONFIG_NAME, META_CONFIG, PREFIX, UNSUPPORTED, WEIGHTS_NAME, by_path
from mufun_jax.sharding import make_mesh
from mufun_jax.torch_files import plan_shards, write_safetensors_shards
from mufun_jax.train_config import TrainConfig
from mufun_jax.train_lib import Trainer, export_model, load_init_params

log = logging.getLogger(__name__)


def adapter_tensors(params: dict, cfg: MuFunConfig) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """A run's trainable parameters (nested: LoRA factors and fully trained tensors) -> (PEFT state
    dict, adapted module names with ``{i}`` for the layer, ``modules_to_save`` module names)."""
    index = by_path(cfg)
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
    base = load_init_params(trainer, cfg.init_from) if cfg.init_from else None
    frozen = trainer.init_frozen(jax.random.key(cfg.seed), base)
    del base
    tmp = dst.resolve().parent / f".{dst.name}.merged-{uuid.uuid4().hex[:8]}"
    try:
        export_model({"params": params, "frozen": frozen}, trainer.model_cfg, None, tmp, trainer.run)
        tok = cfg.data.tokenizer or cfg.init_from
        for name in TOKENIZER_FILES if tok else ():
            if (Path(tok) / name).exists():
                shutil.copy2(Path(tok) / name, tmp / name)
        weights.export_checkpoint(tmp, dst, **kw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
