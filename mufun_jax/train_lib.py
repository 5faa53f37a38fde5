"""MuFun training: sharded state, the jitted step, checkpoints with exact resume, and the loop.

The whole loop is :func:`train`. It reads batches from the Grain loader and feeds them to a
``jax.jit`` step, which has explicit in/out shardings and scans over micro-batches. Each
``save_every`` steps it saves the state to Orbax together with the loader's position. When it
starts again in the same ``output_dir``, it resumes from the newest committed checkpoint and
produces the same losses as an uninterrupted run.

The parameters are a plain nested dict, the same tree that ``nnx.to_pure_dict`` gives and that
the converter writes. The train state keeps them in two parts: ``params``, which train and have
optimizer state, and ``frozen``, which are only read. Gradients are taken with respect to
``params`` alone, so XLA never computes weight gradients for the frozen modules.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from mufun_jax import checkpoint, loading, run_dir
from mufun_jax.config import MuFunConfig
from mufun_jax.data.dataset import audio_root_for, dataset_tokenizer
from mufun_jax.data.loader import Loader, LoaderConfig
from mufun_jax.data.packing import PackConfig
from mufun_jax.errors import EXIT_PREEMPTED
from mufun_jax.loss import loss_sums
from mufun_jax.metrics import MetricsWriter
from mufun_jax.models import MuFun
from mufun_jax.models.layers import FrozenParam
from mufun_jax.models.lora import LoraParam, adapter_params, dropout_key, merge_params
from mufun_jax.models.quant import quantize_params
from mufun_jax.preemption import PreemptionWatch
from mufun_jax.run_settings import MODULES, RunSettings
from mufun_jax.sharding import make_mesh, param_shardings
from mufun_jax.train_config import TrainConfig

log = logging.getLogger(__name__)

MODULE_ROOT = {"whisper": "encoder", "connector": "connector", "llm": "language_model"}
BATCH_KEYS = ("input_ids", "labels", "audio_slots", "positions", "segment_ids", "waves", "chunk_mask")
BATCH_AXES = ("data", "fsdp")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or inf; the update of that step was not applied."""


# -- parameter trees -----------------------------------------------------------------------------


def partition(tree: dict, trainable: set) -> tuple[dict, dict]:
    """Split a nested dict into (trainable leaves, the rest) by path."""
    flat = flatten_dict(tree)
    return (unflatten_dict({p: v for p, v in flat.items() if p in trainable}),
            unflatten_dict({p: v for p, v in flat.items() if p not in trainable}))


def combine(a: dict, b: dict) -> dict:
    return unflatten_dict({**flatten_dict(a), **flatten_dict(b)})


def trainable_paths(model: nnx.Module, trainable: dict[str, str]) -> set[tuple[str, ...]]:
    """Paths of the parameters that train: every ``nnx.Param`` of a module set to ``full``, only
    the LoRA factors of a module set to ``lora``. Whisper's positional table (a
    :class:`FrozenParam`, ``requires_grad=False`` in HF) never trains; quantised codes are not
    parameters at all."""
    full = {MODULE_ROOT[m] for m in MODULES if trainable[m] == "full"}
    adapted = {MODULE_ROOT[m] for m in MODULES if trainable[m] == "lora"}
    out = set()
    for path, v in nnx.iter_graph(model):
        if not path or isinstance(v, FrozenParam) or not isinstance(v, nnx.Param):
            continue
        if str(path[0]) in full or (str(path[0]) in adapted and isinstance(v, LoraParam)):
            out.add(tuple(str(p) for p in path))
    return out


# -- optimizer -------------------------------------------------------------------------------------


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to 0 at ``max_steps`` (HF's ``cosine``) or constant."""
    o, total = cfg.optim, cfg.max_steps
    warm = min(o.warmup_ratio and o.warmup_steps(total), total)
    if o.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, o.lr, max(warm, 1)), optax.constant_schedule(o.lr)],
                                    [warm])
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, warm, max(total, warm + 1), end_value=0.0)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping. Weight decay skips vectors (biases, norms), like HF."""
    o = cfg.optim
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(o.max_grad_norm),
        optax.adamw(lr_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask),
    )


# -- the trainer -----------------------------------------------------------------------------------


class Trainer:
    """Shardings, initialisation and the jitted train / eval steps for one model and mesh."""

    def __init__(self, cfg: TrainConfig, model_cfg: MuFunConfig, mesh, run: RunSettings | None = None):
        self.cfg, self.model_cfg, self.mesh = cfg, model_cfg, mesh
        self.run = cfg.run if run is None else run
        abstract = loading.abstract_model(model_cfg, self.run)
        self.graphdef = nnx.graphdef(abstract)
        self.trainable = trainable_paths(abstract, cfg.trainable)
        self.tx = make_optimizer(cfg)
        self.schedule = lr_schedule(cfg)
        rep = NamedSharding(mesh, P())
        self.replicated = rep
        train_sh, frozen_sh = partition(nnx.to_pure_dict(param_shardings(abstract, mesh)), self.trainable)
        abstract_train, _ = partition(nnx.to_pure_dict(nnx.state(abstract)), self.trainable)
        opt_abstract = jax.eval_shape(self.tx.init, abstract_train)
        opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, opt_abstract, train_sh,
                                       transform_non_params=lambda _: rep)
        self.state_shardings = {"step": rep, "params": train_sh, "frozen": frozen_sh, "opt_state": opt_sh, "rng": rep}
        self.batch_sharding = NamedSharding(mesh, P(None, BATCH_AXES))  # (accum, rows | chunks, ...)
        self.eval_sharding = NamedSharding(mesh, P(BATCH_AXES))
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
                                  out_shardings=(self.state_shardings, rep), donate_argnums=0)
        self.eval_step = jax.jit(self._eval_step, in_shardings=(self.state_shardings, self.eval_sharding),
                                 out_shardings=rep)

    # state -----------------------------------------------------------------------------------

    def _params(self, key, params: dict | None, part: int | None = None) -> dict:
        """The model's parameters in its own structure, computed straight into their shards:
        ``params`` (a float tree in the plain layout, e.g. a converted checkpoint) cast to the
        param dtype, quantised where the run says so and given fresh adapters; or (None) a random
        initialisation. ``part`` 0 / 1 keeps only the trainable / frozen half (XLA drops the rest)."""
        shardings = combine(self.state_shardings["params"], self.state_shardings["frozen"])
        pick = (lambda t: t) if part is None else (lambda t: partition(t, self.trainable)[part])
        out_sh = shardings if part is None else pick(shardings)
        init = lambda k: nnx.to_pure_dict(nnx.state(MuFun(self.model_cfg, self.run, rngs=nnx.Rngs(k))))
        if params is None:
            return jax.jit(lambda k: pick(init(k)), out_shardings=out_sh)(key)
        dt = jnp.dtype(self.run.param_dtype)
        plain = self.run.replace(lora=None, lora_modules=())
        template = nnx.to_pure_dict(nnx.state(loading.abstract_model(self.model_cfg, plain)))

        def build(k, p):
            p = jax.tree.map(lambda a: a.astype(dt), p)
            if self.run.quantize:
                p = quantize_params(p, template)
            if self.run.lora_modules:  # only the adapters of a random init are kept (XLA drops the rest)
                p = combine(p, adapter_params(init(k)))
            return pick(p)

        return jax.jit(build, out_shardings=out_sh)(key, params)

    def init_state(self, key, params: dict | None = None) -> dict:
        """A fresh state from ``params`` (a full float tree, e.g. a converted checkpoint) or a random
        initialisation (see :meth:`_params`)."""
        train, frozen = partition(self._params(key, params), self.trainable)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(train)
        return {"step": jax.device_put(jnp.zeros((), jnp.int32), self.replicated), "params": train, "frozen": frozen,
                "opt_state": opt_state, "rng": jax.jit(jax.random.key_data, out_shardings=self.replicated)(key)}  # own buffer:
                # the state is donated to the step, the caller's key must survive

    def init_frozen(self, key, params: dict | None = None) -> dict:
        """Only the frozen half of :meth:`init_state`'s parameters: checkpoints do not hold it
        (it never changes), so a resumed run rebuilds it from ``init_from`` or the seed."""
        if not self.state_shardings["frozen"]:
            return {}
        return self._params(key, params, part=1)

    def abstract_state(self) -> dict:
        """Shapes, dtypes and shardings of the state, without allocating it (for restores and AOT)."""
        shapes = jax.eval_shape(lambda k: self.init_state(k), jax.random.key(0))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.state_shardings)

    def abstract_params(self) -> dict:
        """Full parameter tree (trainable and frozen) as sharded ShapeDtypeStructs."""
        a = self.abstract_state()
        return combine(a["params"], a["frozen"])

    def abstract_checkpoint(self) -> dict:
        """What a checkpoint holds: the state without its frozen parameters."""
        return {k: v for k, v in self.abstract_state().items() if k != "frozen"}

    def abstract_init_params(self) -> dict:
        """The plain float tree that ``init_from`` is read as (no codes, no adapters)."""
        model = loading.abstract_model(self.model_cfg, self.run.replace(lora=None, lora_modules=(), quantize=None))
        return loading.abstract_params(model, self.mesh)

    # steps -----------------------------------------------------------------------------------

    def _model(self, params, frozen) -> MuFun:
        return nnx.merge(self.graphdef, combine(params, frozen))

    def _train_step(self, state, batch):
        # traced under the mesh, so the activation sharding constraints and the Pallas kernels'
        # shard_map see it (the abstract mesh only: no concrete devices are captured)
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
            return self._train_step_body(state, batch)

    def _train_step_body(self, state, batch):
        params, frozen = state["params"], state["frozen"]

        def loss_sum(p, mb):
            s, n = loss_sums(self._model(p, frozen), mb, self.cfg.loss_chunk)
            return s, n

        grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

        use_dropout = self.run.lora is not None and self.run.lora.dropout > 0
        step_key = jax.random.wrap_key_data(state["rng"])

        def micro(carry, xs):
            (g_acc, s_acc, n_acc), (mb, i) = carry, xs
            with dropout_key(jax.random.fold_in(step_key, i) if use_dropout else None):
                (s, n), g = grad_fn(params, mb)
            return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, n_acc + n), None

        zero = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0))
        accum = jax.tree.leaves(batch)[0].shape[0]
        (g, s, n), _ = jax.lax.scan(micro, zero, (batch, jnp.arange(accum)))
        scale = 1.0 / jnp.maximum(n, 1.0)  # mean over every label token of the global batch
        grads = jax.tree.map(lambda x: x * scale, g)
        loss, grad_norm = s * scale, optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # never apply a bad update
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
        new_state = {"step": state["step"] + 1, "params": keep(new_params, params), "frozen": frozen,
                     "opt_state": keep(opt_state, state["opt_state"]), "rng": rng}
        return new_state, {"loss": loss, "label_tokens": n, "grad_norm": grad_norm}

    def _eval_step(self, state, batch):
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
            return loss_sums(self._model(state["params"], state["frozen"]), batch, self.cfg.loss_chunk)

    # batches -----------------------------------------------------------------------------------

    def global_batch(self, micro: list[dict]) -> dict:
        """Host-local micro-batches -> global arrays (accum, rows, ...) split over data x fsdp."""
        local = {k: np.stack([m[k] for m in micro]) for k in BATCH_KEYS}
        local["audio_slots"] = self._global_slots(local["audio_slots"], local["waves"].shape[1], self.batch_sharding, 1)
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()}

    def global_eval_batch(self, batch: dict) -> dict:
        local = dict(batch)
        local["audio_slots"] = self._global_slots(batch["audio_slots"], batch["waves"].shape[0], self.eval_sharding, 0)
        return {k: jax.make_array_from_process_local_data(self.eval_sharding, local[k]) for k in BATCH_KEYS}

    def _global_slots(self, slots: np.ndarray, local_chunks: int, sharding, dim: int) -> np.ndarray:
        """Each host's packer numbers the audio slots of its rows against its own chunks (from 0).
        In the global array this host's chunks sit where its devices' shards are, so renumber the
        slots to those global chunk positions; on one host this is the identity."""
        if jax.process_count() == 1:
            return slots

        def spans(n):  # this host's (start, stop) along the chunk axis of a global chunk axis of n
            shape = (1,) * dim + (n,)
            return sorted({(ix[dim].start or 0, ix[dim].stop or n)
                           for ix in sharding.addressable_devices_indices_map(shape).values()})

        n_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        per_shard, rest = divmod(local_chunks, len(spans(n_shards)))
        lookup = np.concatenate([np.arange(a, b) for a, b in spans(n_shards * per_shard)])
        if rest or len(lookup) != local_chunks:
            raise ValueError(f"this host holds {local_chunks} audio chunks per batch, which does not split evenly over "
                             f"its {len(spans(n_shards))} batch shards: make data.max_chunks a multiple of the "
                             f"data x fsdp device count")
        tpc = self.model_cfg.tokens_per_chunk
        safe = np.maximum(slots, 0)
        return np.where(slots >= 0, lookup[safe // tpc] * tpc + safe % tpc, -1).astype(slots.dtype)


# -- export ----------------------------------------------------------------------------------------


def export_model(state: dict, model_cfg: MuFunConfig, tokenizer, dst, run: RunSettings | None = None) -> None:
    """Write the trained parameters as a model directory (:mod:`mufun_jax.checkpoint`: the same
    layout the converter writes), which ``init_from``, inference and ``convert_weights.py export``
    read. Run settings are not saved with it."""
    params = combine(state["params"], state["frozen"])
    if run is not None and (run.lora_modules or run.quantize):  # the plain layout: adapters merged, codes dequantised
        if run.quantize:
            log.info("exporting with the adapters merged into the dequantised %s base", run.quantize)
        dt = jnp.dtype(run.param_dtype)
        params = jax.jit(lambda p: jax.tree.map(lambda a: a.astype(dt), merge_params(p, run.lora.scaling if run.lora
                                                                                      else 1.0)))(params)
    checkpoint.save_model(dst, model_cfg, params, tokenizer=tokenizer, overwrite=True)


# -- data ------------------------------------------------------------------------------------------


def make_loader(cfg: TrainConfig, model_cfg: MuFunConfig, tokenizer, mesh, *, eval: bool = False):
    """This host's loader. Rows and chunks are split over data x fsdp devices, then over hosts."""
    d = cfg.data
    path = d.eval_dataset if eval else d.dataset
    n = jax.process_count()
    d.check_split(n, f"the number of hosts ({n})")
    devices = mesh.shape["data"] * mesh.shape["fsdp"]
    d.check_split(devices, f"mesh data x fsdp = {devices} (rows and audio chunks are split over those devices)")
    pack = PackConfig(batch_size=d.batch_size // n, seq_len=d.seq_len, max_chunks=d.max_chunks // n,
                      tokens_per_chunk=model_cfg.tokens_per_chunk, pack=d.pack, too_long=d.too_long,
                      pad_token_id=_pad_id(tokenizer))
    root = audio_root_for(path, d.audio_root)  # the one rule, shared with ``python -m mufun_jax.data validate``
    return Loader(LoaderConfig(dataset=path, pack=pack, template=d.template, audio_root=root, seed=d.seed,
                               shuffle=d.shuffle and not eval, num_epochs=1 if eval else d.num_epochs,
                               worker_count=d.worker_count, process_index=jax.process_index(), process_count=n),
                  tokenizer)


def _pad_id(tokenizer) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    return int(pid if pid is not None else tokenizer.eos_token_id)


# -- the loop --------------------------------------------------------------------------------------


def maybe_initialize_distributed(flag: bool | None) -> None:
    """``jax.distributed.initialize()`` when asked, or (flag None) when the launcher set a
    coordinator or a multi-host TPU slice; must run before anything touches the devices."""
    env = os.environ
    auto = bool(env.get("JAX_COORDINATOR_ADDRESS")) or len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1 \
        or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))
    if flag or (flag is None and auto):
        jax.distributed.initialize()


def evaluate(trainer: Trainer, state: dict, cfg: TrainConfig, tokenizer) -> dict:
    loader = make_loader(cfg, trainer.model_cfg, tokenizer, trainer.mesh, eval=True)
    s = n = 0.0
    for i, batch in enumerate(loader):
        if cfg.eval_batches is not None and i >= cfg.eval_batches:
            break
        bs, bn = jax.device_get(trainer.eval_step(state, trainer.global_eval_batch(batch)))
        s, n = s + float(bs), n + float(bn)
    return {"eval_loss": s / max(n, 1.0), "eval_label_tokens": n,
            **{f"eval_skipped/{k}": v for k, v in loader.counter.items()}}


def load_init_params(trainer: Trainer, path) -> dict:
    """``init_from``'s parameters, read straight into the trainer's shardings and param dtype."""
    return checkpoint.load_params(path, trainer.abstract_init_params())


def train(cfg: TrainConfig, *, profile: bool = False, on_step: Callable[[int, dict], None] | None = None,
          force: bool = False) -> dict:
    """Run (or resume) training as configured; returns the last step's metrics. Nothing is written
    until the inputs are checked and ``output_dir``'s checkpoints are known to fit the config
    (:mod:`mufun_jax.run_dir`; ``force`` resumes checkpoints of another model or trainable set)."""
    maybe_initialize_distributed(cfg.distributed)
    run_dir.check_inputs(cfg)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    model_cfg = cfg.model_config()
    tokenizer = dataset_tokenizer(cfg.data.tokenizer or cfg.init_from)
    if len(tokenizer) > model_cfg.qwen3.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model_cfg.qwen3.vocab_size}; use a matching tokenizer or set model.qwen3.vocab_size")
    main = jax.process_index() == 0
    out = run_dir.prepare(cfg, force=force, write=main)
    trainer = Trainer(cfg, model_cfg, mesh)
    loader = make_loader(cfg, model_cfg, tokenizer, mesh)
    mngr = run_dir.train_checkpoint_manager(cfg.output_dir, cfg.keep, cfg.async_checkpointing)
    start = mngr.latest_step()
    key = jax.random.key(cfg.seed)
    if start is not None:
        state, loader_state = run_dir.restore_train_state(mngr, start, trainer.abstract_checkpoint())
        has_frozen = bool(trainer.state_shardings["frozen"])
        params = load_init_params(trainer, cfg.init_from) if cfg.init_from and has_frozen else None
        state["frozen"] = trainer.init_frozen(key, params)
        del params
        loader.set_state(loader_state)
        log.info("resumed from %s at step %d", out / "checkpoints" / str(start), start)
    else:
        start = 0
        params = load_init_params(trainer, cfg.init_from) if cfg.init_from else None
        state = trainer.init_state(key, params)
        del params
    if main:  # only now: a resume that fails to restore leaves the checkpoints' own config in place
        run_dir.write_config(out, cfg)
    n_train, n_frozen = (sum(int(np.prod(s.shape)) for s in jax.tree.leaves(state[k])) for k in ("params", "frozen"))
    log.info("mesh %s; %s trainable and %s frozen parameters (%s)", dict(mesh.shape), f"{n_train:,}",
             f"{n_frozen:,}", cfg.trainable)
    local = Path(cfg.output_dir) if "://" not in cfg.output_dir else Path("logs") / Path(cfg.output_dir).name
    writer = MetricsWriter(local, enabled=main)
    bar = tqdm(total=cfg.max_steps, initial=start, desc="train", disable=not (cfg.progress and main), unit="step")
    metrics: dict = {}
    last_eval = None
    step = start
    t_last, tokens_since = time.perf_counter(), 0
    watch = PreemptionWatch()
    try:
        while step < cfg.max_steps:
            micro = []
            for _ in range(cfg.optim.grad_accum):
                try:
                    micro.append(next(loader))
                except StopIteration:
                    break
            if len(micro) < cfg.optim.grad_accum:
                bar.close()  # log lines under the bar, never glued to its end
                log.warning("the training data ran out at step %d (of max_steps=%d); %d leftover micro-batch(es) "
                            "not used; stopping", step, cfg.max_steps, len(micro))
                break
            if profile and step == start + 2:
                jax.profiler.start_trace(str(local / "profile"))
            state, m = trainer.train_step(state, trainer.global_batch(micro))
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            step += 1
            if profile and step == start + 5:
                jax.profiler.stop_trace()
                log.info("profile written to %s", local / "profile")
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                raise NonFiniteLossError(
                    f"step {step}: loss={m['loss']} grad_norm={m['grad_norm']} is not finite; the update was not "
                    f"applied and no checkpoint of it was written. The last good checkpoint is step "
                    f"{mngr.latest_step()}. Lower optim.lr, check the data (the samples of this step were "
                    f"{_ids(micro)}), or use float32 compute (dtype=float32).")
            tokens_since += sum(int((mb["segment_ids"] != 0).sum()) for mb in micro) * jax.process_count()
            m["lr"] = float(trainer.schedule(step - 1))
            m["samples"] = sum(len(mb["sample_ids"]) for mb in micro) * jax.process_count()
            metrics = m
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                now = time.perf_counter()
                m["tokens_per_s"] = tokens_since / (now - t_last)
                t_last, tokens_since = now, 0
                writer.write(step, {**m, **{f"skipped/{k}": v for k, v in loader.counter.items()}})
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_s']:.0f}",
                                refresh=False)
            bar.update(1)
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                run_dir.save_train_state(mngr, step, state, loader.get_state())
            if cfg.data.eval_dataset and cfg.eval_every and step % cfg.eval_every == 0:
                last_eval = (step, evaluate(trainer, state, cfg, tokenizer))
                writer.write(step, last_eval[1])
            if on_step is not None:
                on_step(step, m)
            if watch.reached(step):
                if mngr.latest_step() != step:
                    run_dir.save_train_state(mngr, step, state, loader.get_state())
                mngr.wait_until_finished()
                bar.close()
                took = time.perf_counter() - watch.signal_at
                log.warning("preempted: the checkpoint of step %d is committed (%.1f s after the notice); exiting "
                            "with status %d: run the same command again to resume", step, took, EXIT_PREEMPTED)
                return {"step": step, **metrics, "preempted": True, "notice_to_commit_s": took,
                        "skipped": dict(loader.counter)}
        bar.close()
        if mngr.latest_step() != step:
            run_dir.save_train_state(mngr, step, state, loader.get_state())
        mngr.wait_until_finished()
        if cfg.data.eval_dataset:
            if last_eval is None or last_eval[0] != step:
                last_eval = (step, evaluate(trainer, state, cfg, tokenizer))
                writer.write(step, last_eval[1])
            metrics = {**metrics, **last_eval[1]}
            log.info("eval loss at step %d: %.4f", step, last_eval[1]["eval_loss"])
        export_model(state, model_cfg, tokenizer, out / "model", trainer.run)
        if loader.counter:
            log.warning("skipped samples:\n%s", loader.counter.report())
    finally:
        watch.close()
        bar.close()
        writer.close()
        mngr.close()
    return {"step": step, **metrics, "skipped": dict(loader.counter)}


def _ids(micro: list[dict]) -> list:
    ids = [i for mb in micro for i in mb["sample_ids"]]
    return ids[:8] + (["..."] if len(ids) > 8 else [])
