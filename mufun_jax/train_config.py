"""The training configuration: one YAML file plus ``key=value`` overrides with dotted keys.

Every field has a default that is sensible for the tiny CPU demo; the 8B recipes in
``configs/`` override what the reference scripts set. Unknown keys are errors (a typo in a
recipe should never be silently ignored).

The model section is architecture only, resolved to a typed :class:`MuFunConfig` when the
config loads: ``{preset: NAME, ...overrides}``, overrides of ``init_from``'s saved config, or a
whole model dict. How the model runs (``dtype``, ``param_dtype``, ``remat_policy``,
``attention_impl``) is set at the top level and never saved with the weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import yaml

from mufun_jax.checkpoint import has_model, load_config
from mufun_jax.config import MuFunConfig, resolve_model
from mufun_jax.run_settings import MODULES, RUN_KEYS, LoraConfig, RunSettings
from mufun_jax.data.templates import TEMPLATES

log = logging.getLogger(__name__)

TRAIN_MODES = ("full", "frozen", "lora")


@dataclasses.dataclass
class DataConfig:
    dataset: str | None = None  # JSON / JSONL in MuFun's training schema
    eval_dataset: str | None = None  # optional; evaluation is skipped without it
    audio_root: str | None = None  # audio paths are relative to this (default: the dataset's folder)
    tokenizer: str | None = None  # tokenizer directory (default: init_from)
    template: str = "qwen2_instruct"  # qwen2_instruct | qwen2_base | pretrain
    batch_size: int = 8  # global rows per micro-batch (all hosts together)
    seq_len: int = 1024  # tokens per row, audio slots included
    max_chunks: int = 8  # 30 s audio chunks per micro-batch (global)
    pack: bool = True  # several samples per row (segment-masked attention)
    too_long: str = "skip"  # skip | truncate_audio
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None  # None: repeat until max_steps
    worker_count: int = 0  # Grain worker processes for decoding and tokenising

    def check_split(self, n: int, over: str) -> None:
        """Rows and audio chunks are split evenly ``over`` something of size ``n`` (the hosts, the
        data x fsdp devices): the one check, shared by training and the AOT compile."""
        for name, v in (("data.batch_size", self.batch_size), ("data.max_chunks", self.max_chunks)):
            if v % n:
                raise ValueError(f"{name}={v} must be divisible by {over}")


@dataclasses.dataclass
class OptimConfig:
    lr: float = 2e-5
    schedule: str = "cosine"  # cosine | constant (both after a linear warmup)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    grad_accum: int = 1  # micro-batches per optimizer step (a scan inside the step)

    def warmup_steps(self, max_steps: int) -> int:
        return math.ceil(self.warmup_ratio * max_steps)


@dataclasses.dataclass
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: all remaining devices
    tensor: int = 1


@dataclasses.dataclass
class TrainConfig:
    output_dir: str = "runs/demo"
    # The architecture, resolved when the config loads; None only while init_from has no saved config
    # yet (then ``model_overrides`` waits for it, see resolve_model_config).
    model: MuFunConfig | None = None
    init_from: str | None = None  # a converted checkpoint directory (convert_weights.py / a previous stage)
    model_overrides: dict = dataclasses.field(default_factory=dict)  # the YAML's model section, as written
    # run settings: how the model runs here, not saved with it
    dtype: str = "float32"  # compute dtype of the matmuls (bfloat16 on TPU/GPU)
    param_dtype: str = "float32"  # parameters and optimizer state
    remat_policy: str = "none"
    attention_impl: str = "auto"  # auto: splash on TPU, cudnn on GPU (16-bit), blocked on CPU
    trainable: dict = dataclasses.field(default_factory=lambda: {m: "full" for m in MODULES})  # full|frozen|lora
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)  # for the modules set to lora
    quantize: str | None = None  # int8 | nf4: the frozen base of the frozen and lora modules (QLoRA)
    max_steps: int = 100
    seed: int = 0
    save_every: int = 1000
    keep: int = 3  # checkpoints kept
    async_checkpointing: bool = True
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only at the end (if an eval set is given)
    eval_batches: int | None = None  # cap per evaluation (None: the whole eval set)
    loss_chunk: int = 0  # tokens per device per chunk of the vocabulary projection in the loss (0: all at once)
    distributed: bool | None = None  # jax.distributed.initialize(); None: when the launch environment says so
    progress: bool = True
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    recipe: str = "sft"  # sft (train_lib) | grpo (mufun_jax/grpo: rollouts on the engine, rewards, GRPO loss)
    grpo: dict = dataclasses.field(default_factory=dict)  # recipe grpo's settings (mufun_jax/grpo/config.py)

    def __post_init__(self):
        if self.recipe not in ("sft", "grpo"):
            raise ValueError(f"recipe={self.recipe!r}: allowed 'sft' or 'grpo'")
        if self.recipe == "grpo":
            from mufun_jax.grpo.config import GRPOConfig  # validated now; a one-way import (grpo reads no config)

            GRPOConfig.from_dict(self.grpo)
        elif self.grpo:
            raise ValueError("a grpo section is given but recipe is 'sft'; set recipe: grpo")
        bad = {k: v for k, v in self.trainable.items() if k not in MODULES or v not in TRAIN_MODES}
        if bad:
            raise ValueError(f"trainable={self.trainable}: modules are {MODULES} and modes {TRAIN_MODES}; bad: {bad}")
        self.trainable = {m: self.trainable.get(m, "full") for m in MODULES}
        if all(v == "frozen" for v in self.trainable.values()):
            raise ValueError("trainable: every module is frozen, so there is nothing to train")
        self._check_values()
        if self.quantize not in (None, "none") and all(v == "full" for v in self.trainable.values()):
            raise ValueError(f"quantize={self.quantize!r} applies to the frozen base of frozen or lora modules, "
                             f"but every module trains in full: {self.trainable}")
        self.run  # validates the run settings

    def _check_values(self) -> None:
        """Reject values no run can use, naming the key and what is allowed: a negative learning rate
        or a warmup longer than the run would otherwise train to the end with status 0."""
        o, d, m = self.optim, self.data, self.mesh
        pos_int = "a positive integer (>= 1)"
        checks = [(k, v, _is_int(v) and v >= 1, pos_int) for k, v in [
            ("max_steps", self.max_steps), ("save_every", self.save_every), ("keep", self.keep),
            ("log_every", self.log_every), ("optim.grad_accum", o.grad_accum), ("data.batch_size", d.batch_size),
            ("data.seq_len", d.seq_len), ("data.max_chunks", d.max_chunks), ("mesh.data", m.data),
            ("mesh.tensor", m.tensor)]]
        checks += [
            ("optim.lr", o.lr, _is_num(o.lr) and 0 < o.lr < math.inf, "a number > 0"),
            ("optim.warmup_ratio", o.warmup_ratio, _is_num(o.warmup_ratio) and 0 <= o.warmup_ratio <= 1,
             "a number in [0, 1] (the warmup is that fraction of max_steps, never longer than the run)"),
            ("optim.weight_decay", o.weight_decay, _is_num(o.weight_decay) and 0 <= o.weight_decay < math.inf,
             "a number >= 0"),
            ("optim.b1", o.b1, _is_num(o.b1) and 0 <= o.b1 < 1, "a number in [0, 1)"),
            ("optim.b2", o.b2, _is_num(o.b2) and 0 <= o.b2 < 1, "a number in [0, 1)"),
            ("optim.eps", o.eps, _is_num(o.eps) and 0 < o.eps < math.inf, "a number > 0"),
            ("optim.max_grad_norm", o.max_grad_norm, _is_num(o.max_grad_norm) and 0 < o.max_grad_norm,
             "a number > 0 (inf: no clipping)"),
            ("optim.schedule", o.schedule, o.schedule in ("cosine", "constant"), "'cosine' or 'constant'"),
            ("mesh.fsdp", m.fsdp, _is_int(m.fsdp) and (m.fsdp >= 1 or m.fsdp == -1),
             "a positive integer, or -1 (all remaining devices)"),
            ("seed", self.seed, _is_int(self.seed) and self.seed >= 0, "an integer >= 0"),
            ("data.seed", d.seed, _is_int(d.seed) and d.seed >= 0, "an integer >= 0"),
            ("eval_every", self.eval_every, _is_int(self.eval_every) and self.eval_every >= 0,
             "an integer >= 0 (0: evaluate only at the end)"),
            ("eval_batches", self.eval_batches, self.eval_batches is None
             or (_is_int(self.eval_batches) and self.eval_batches >= 1), "a positive integer, or null (all)"),
            ("loss_chunk", self.loss_chunk, _is_int(self.loss_chunk) and self.loss_chunk >= 0,
             "an integer >= 0 (0: the whole vocabulary at once)"),
            ("data.num_epochs", d.num_epochs, d.num_epochs is None or (_is_int(d.num_epochs) and d.num_epochs >= 1),
             "a positive integer, or null (repeat until max_steps)"),
            ("data.worker_count", d.worker_count, _is_int(d.worker_count) and d.worker_count >= 0,
             "an integer >= 0"),
            ("data.template", d.template, d.template in TEMPLATES, " or ".join(map(repr, sorted(TEMPLATES)))),
            ("data.too_long", d.too_long, d.too_long in ("skip", "truncate_audio"), "'skip' or 'truncate_audio'"),
            ("progress", self.progress, isinstance(self.progress, bool), "true or false"),
        ]
        bad = [f"{k}={v!r}: allowed {allowed}" for k, v, ok, allowed in checks if not ok]
        if bad:
            raise ValueError("bad training config value" + ("s" if len(bad) > 1 else "") + ": " + "; ".join(bad))

    @property
    def run(self) -> RunSettings:
        lora_modules = tuple(m for m in MODULES if self.trainable[m] == "lora")
        return RunSettings(self.dtype, self.param_dtype, self.remat_policy, self.attention_impl,
                           lora=self.lora if lora_modules else None, lora_modules=lora_modules,
                           quantize=self.quantize,
                           quantize_modules=tuple(m for m in MODULES if self.trainable[m] != "full"))

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        d = dict(d)
        raw = dict(d.pop("model", None) or {})
        moved = {k: raw.pop(k) for k in RUN_KEYS if k in raw}
        if moved:  # older recipes kept run settings in the model section
            log.info("model.%s are run settings: read as top-level keys", ", model.".join(moved))
            for k, v in moved.items():
                d.setdefault(k, v)
        d.pop("model_overrides", None)  # written by to_dict; the model section is the source
        sub = {"data": DataConfig, "optim": OptimConfig, "mesh": MeshConfig, "lora": LoraConfig}
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                v = d.pop(f.name)
                kw[f.name] = _build(sub[f.name], v or {}, f.name) if f.name in sub else _coerce(v, f.type, f.name)
        if d:
            raise ValueError(f"unknown training config keys {sorted(d)}; known: {[f.name for f in dataclasses.fields(cls)]}")
        kw["model"] = resolve_model_config(raw, kw.get("init_from"))
        return cls(model_overrides=raw, **kw)

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] = ()) -> "TrainConfig":
        """A YAML file (or nothing) with ``a.b=value`` overrides applied; values parse as YAML."""
        d: dict = {}
        if path is not None:
            with open(path) as f:
                try:
                    d = yaml.safe_load(f) or {}
                except yaml.YAMLError as e:
                    raise ValueError(f"{path}: not valid YAML: {_yaml_message(e)}") from e
            if not isinstance(d, dict):
                raise ValueError(f"{path}: expected a mapping at the top level")
        for o in overrides:
            key, sep, value = o.partition("=")
            if not sep or not key:
                raise ValueError(f"override {o!r} must look like key=value (e.g. optim.lr=1e-4)")
            node = d
            parts = key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise ValueError(f"override {o!r}: {p!r} is not a section")
            try:
                node[parts[-1]] = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ValueError(f"override {o!r}: the value is not valid YAML: {_yaml_message(e)}") from e
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict() if self.model is not None else dict(self.model_overrides)
        d.pop("model_overrides")
        return d

    def model_config(self) -> MuFunConfig:
        """The resolved architecture; a clear error while there is none."""
        if self.model is not None:
            return self.model
        if self.init_from:
            raise ValueError(f"init_from={self.init_from}: no MuFun model there (no mufun_config.json); convert a "
                             "checkpoint with convert_weights.py import, or run the previous stage first")
        raise ValueError("no model: set model.preset (e.g. mufun-tiny) or init_from (a model directory)")


def resolve_model_config(model: Mapping[str, Any], init_from: str | None) -> MuFunConfig | None:
    """The model section -> a typed config: ``{preset: NAME, ...}`` (the preset plus overrides),
    overrides of ``init_from``'s saved config, or a whole model dict. None when ``init_from`` has no
    saved config yet (a later stage configured before the earlier one ran)."""
    model = dict(model)
    name = model.pop("preset", None)
    if name is not None:
        if init_from:
            raise ValueError("give model.preset or init_from, not both (init_from carries its own config)")
        return resolve_model(name, model)
    if init_from:
        return resolve_model(load_config(init_from), model) if has_model(init_from) else None
    return MuFunConfig.from_dict(model) if model else None


def _build(cls, d: Mapping[str, Any], where: str):
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown keys in {where}: {unknown}; known: {sorted(fields)}")
    return cls(**{k: _coerce(v, fields[k].type, f"{where}.{k}") for k, v in d.items()})


def _coerce(v, annotation: str, where: str):
    """YAML reads ``2e-5`` (no dot) as a string; numbers are converted by the field's type."""
    if annotation == "float" and isinstance(v, (str, int)) and not isinstance(v, bool):
        try:
            return float(v)
        except ValueError:
            raise ValueError(f"{where}={v!r} must be a number") from None
    return v


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _yaml_message(e: Exception) -> str:
    """PyYAML's multi-line message (problem, then where) as one line."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())
