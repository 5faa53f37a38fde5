"""A training run's output directory, checked before anything is written to it.

``train()`` resumes from the newest checkpoint in ``output_dir``. That is only right when the
checkpoints were trained with the same model and the same trainable set as the config now asks
for: otherwise a frozen module silently changes under the saved trainable weights (and the run
trains, and exports, a different model than the one saved), or Orbax stops with a shape error
that names no parameter. So before a run writes its ``train_config.json``, its metrics or its
model, :func:`prepare` compares the saved ``train_config.json`` with the new config and refuses a
mismatch, naming every differing key, unless ``force`` is given. The inputs (the dataset files)
are checked first too, so that a typo never leaves a half-made output directory behind.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
from pathlib import Path

import orbax.checkpoint as ocp

from mufun_jax.checkpoint import location
from mufun_jax.config import MuFunConfig
from mufun_jax.run_settings import MODULES, LoraConfig
from mufun_jax.errors import CheckpointError
from mufun_jax.train_config import TrainConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "train_config.json"


class ResumeMismatchError(ValueError):
    """``output_dir`` holds checkpoints of a different model or trainable set than the config."""


def check_inputs(cfg: TrainConfig) -> None:
    """The dataset files exist (local paths; ``gs://`` ones are read later) and a tokenizer is set."""
    if cfg.data.dataset is None:
        raise ValueError("data.dataset is not set: give the training JSON / JSONL")
    if (cfg.data.tokenizer or cfg.init_from) is None:
        raise ValueError("no tokenizer: set data.tokenizer (a tokenizer directory) or init_from")
    for key, path in (("data.dataset", cfg.data.dataset), ("data.eval_dataset", cfg.data.eval_dataset)):
        if path is not None and "://" not in str(path) and not Path(path).is_file():
            why = "is a directory, not a JSON / JSONL file" if Path(path).is_dir() else "no such file"
            raise FileNotFoundError(errno.ENOENT, f"{why} ({key})", str(path))


def newest_step(output_dir) -> int | None:
    """The newest checkpoint step saved under ``output_dir`` (Orbax's ``checkpoints/<step>``), or None."""
    ckpts = location(output_dir) / "checkpoints"
    if not ckpts.is_dir():
        return None
    steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()]
    return max(steps) if steps else None


def resume_key(d: dict) -> dict[str, object]:
    """The parts of a ``train_config.json`` dict that must match to resume, flattened to dotted
    keys: the architecture (with today's defaults filled in, so that a field added since the run
    started is not a difference), the trainable mode of each module, and the LoRA settings when a
    module trains as LoRA (they set the adapters' shapes)."""
    model = d.get("model") or {}
    try:
        model = MuFunConfig.from_dict(model).to_dict()
    except (TypeError, ValueError, KeyError):  # written by another version: compare it as it is
        pass
    trainable = {m: (d.get("trainable") or {}).get(m, "full") for m in MODULES}
    out = {"model": model, "trainable": trainable}
    if "lora" in trainable.values():
        lora = d.get("lora") or {}
        try:
            lora = json.loads(json.dumps(dataclasses.asdict(LoraConfig(**lora))))
        except (TypeError, ValueError):
            pass
        out["lora"] = lora
    return _flatten(json.loads(json.dumps(out)))


def differences(saved: dict, new: dict) -> list[str]:
    """``key: saved A, now B`` for every key of :func:`resume_key` that differs."""
    a, b = resume_key(saved), resume_key(new)
    missing = "(not set)"
    return [f"{k}: saved {a.get(k, missing)!r}, now {b.get(k, missing)!r}".replace("'", "")
            for k in sorted(set(a) | set(b), key=lambda k: (k.count("."), k)) if a.get(k, missing) != b.get(k, missing)]


def check_resume(cfg: TrainConfig, force: bool = False) -> int | None:
    """The step a run in ``cfg.output_dir`` resumes from (None: a fresh run); raises
    :class:`ResumeMismatchError` when its checkpoints belong to another model or trainable set."""
    step = newest_step(cfg.output_dir)
    if step is None:
        return None
    saved_file = location(cfg.output_dir) / CONFIG_FILE
    if not saved_file.exists():
        log.warning("%s has checkpoints but no %s: cannot check that they match this config", cfg.output_dir,
                    CONFIG_FILE)
        return step
    try:
        saved = json.loads(saved_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{saved_file}: not valid JSON ({e}); it records the config of the checkpoints in "
                         f"{cfg.output_dir}") from e
    diff = differences(saved, cfg.to_dict())
    if not diff:
        return step
    if force:
        log.warning("--force: resuming %s/checkpoints/%d although the config differs: %s", cfg.output_dir, step,
                    "; ".join(diff))
        return step
    raise ResumeMismatchError(
        f"{cfg.output_dir} holds checkpoints (newest: step {step}) of a different model or trainable set than "
        f"this config: {'; '.join(diff)}. Nothing was changed there. Use a new output_dir to train this config, "
        f"or pass --force to resume those checkpoints with it anyway ({saved_file} has their config)")


def prepare(cfg: TrainConfig, *, force: bool = False, write: bool = True):
    """Check that ``output_dir`` can take this run (see the module docstring) and create it (only
    where ``write``: process 0). Returns the directory (an ``epath.Path``). The config is written
    by :func:`write_config` once the state is built: a ``--force`` resume that fails to restore
    leaves the saved config, the record of what the checkpoints are, as it was."""
    check_resume(cfg, force)
    out = location(cfg.output_dir)
    if write:
        out.mkdir(parents=True, exist_ok=True)
    return out


def write_config(out, cfg: TrainConfig) -> None:
    (out / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2))


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# -- the run's checkpoints (state + loader position, one per saved step) -------------------------------


def train_checkpoint_manager(output_dir, keep: int, async_checkpointing: bool = True):
    """The Orbax manager of a training run's ``OUTPUT_DIR/checkpoints/<step>/``."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_checkpointing,
                                           cleanup_tmp_directories=True, create=True)
    return ocp.CheckpointManager(location(output_dir) / "checkpoints", options=options)


def save_train_state(mngr, step: int, state: dict, loader_state: dict) -> None:
    """The state without its frozen parameters (they never change: see ``Trainer.init_frozen``)."""
    saved = {k: v for k, v in state.items() if k != "frozen"}
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(saved), data=ocp.args.JsonSave(loader_state)),
              force=True)


def restore_train_state(mngr, step: int, abstract_state: dict) -> tuple[dict, dict]:
    """The saved state and loader position of ``step``; a checkpoint that does not fit
    ``abstract_state`` (resumed with ``--force`` under another model) is a CheckpointError naming it."""
    try:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                         data=ocp.args.JsonRestore()))
    except ValueError as e:
        raise CheckpointError(f"{mngr.directory / str(step)}: does not fit this config's train state: {e}") from e
    return out["state"], out["data"]
