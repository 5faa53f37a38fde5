"""The GRPO recipe's trainer and loop, in train_lib's style: the same sharded state, optimizer,
checkpoints with exact resume, preemption handling and model export; the batch comes from
rollouts on the engine instead of the data loader.

One **step** is one rollout batch: P prompts x G completions sampled by the engine from the
policy's current weights, rewards, group-normalised advantages, then ``num_iterations`` (mu)
jitted policy updates on that batch (the learning-rate schedule counts updates). The old
log-probs (mu > 1) and the reference's are computed once, at rollout time, by the same jitted
per-token function the loss uses. After the updates the engine gets the new weights (the same
arrays: no copy) and its caches are cleared.

**Reference model.** LoRA: the policy with its adapters off (``lora_b`` zero), so no second copy
of the base; modules trained in full (e.g. the connector of the LoRA recipe) keep a frozen copy of
their initial weights. Full training: a frozen copy of the trainable weights, sharded like them.
Only when beta > 0. The copy is not checkpointed: it is the initial weights, rebuilt from
``init_from`` (or the seed) on resume, like the frozen modules.

Tunix's ``GRPOLearner`` was tried first: see docs/grpo.md, "Why not Tunix".
"""

from __future__ import annotations

import dataclasses
import logging
import math
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

from mufun_jax import run_dir
from mufun_jax.errors import EXIT_PREEMPTED
from mufun_jax.grpo import rewards as rewards_lib
from mufun_jax.grpo import rollout
from mufun_jax.grpo.config import GRPOConfig
from mufun_jax.grpo.loss import advantages, grpo_loss
from mufun_jax.metrics import MetricsWriter
from mufun_jax.models.lora import dropout_key
from mufun_jax.preemption import PreemptionWatch
from mufun_jax.sharding import make_mesh
from mufun_jax.train_config import TrainConfig
from mufun_jax.train_lib import (BATCH_AXES, NonFiniteLossError, Trainer, combine, export_model, load_init_params,
                                 maybe_initialize_distributed, partition)

log = logging.getLogger(__name__)
ROW_KEYS = ("input_ids", "audio_slots", "positions", "segment_ids", "gather", "targets", "mask")


class GRPOTrainer(Trainer):
    """Trainer's state and shardings plus the GRPO update, the per-token log-prob function and
    the reference model."""

    def __init__(self, cfg: TrainConfig, model_cfg, mesh, gcfg: GRPOConfig):
        # the schedule counts optimizer updates: mu per rollout step
        super().__init__(dataclasses.replace(cfg, max_steps=cfg.max_steps * gcfg.num_iterations), model_cfg, mesh,
                         cfg.run)
        self.gcfg = gcfg
        self.lora_b = {p for p in self.trainable if p[-1] == "lora_b"}
        ref_paths = {p for p in self.trainable if p[-1] not in ("lora_a", "lora_b")}
        self.ref_paths = ref_paths if gcfg.beta > 0 else set()
        if self.ref_paths:
            self.state_shardings["ref"] = partition(self.state_shardings["params"], self.ref_paths)[0]
        rep = self.replicated
        self.update = jax.jit(self._update, donate_argnums=0, out_shardings=(self.state_shardings, rep))
        self.logps = jax.jit(lambda st, b: self._logps(st["params"], st["frozen"], b))
        self.ref_logps = jax.jit(lambda st, b: self._logps(self.ref_params(st), st["frozen"], b))

    # state -----------------------------------------------------------------------------------

    def init_state(self, key, params: dict | None = None) -> dict:
        state = super().init_state(key, params)
        if self.ref_paths:
            state["ref"] = self.ref_copy(state["params"])
        return state

    def ref_copy(self, train: dict) -> dict:
        """Fresh buffers (the state is donated to the update; the reference must survive it)."""
        return jax.jit(lambda t: jax.tree.map(jnp.copy, partition(t, self.ref_paths)[0]),
                       out_shardings=self.state_shardings.get("ref"))(train)

    def abstract_checkpoint(self) -> dict:
        return {k: v for k, v in self.abstract_state().items() if k not in ("frozen", "ref")}

    def ref_params(self, state) -> dict:
        """The reference's trainable half: adapters off, fully trained leaves at their initial values."""
        flat = flatten_dict(state["params"])
        ref = flatten_dict(state.get("ref", {}))
        out = {p: (jnp.zeros_like(v) if p in self.lora_b else ref.get(p, v)) for p, v in flat.items()}
        return jax.lax.stop_gradient(unflatten_dict(out))

    # device functions ------------------------------------------------------------------------

    def _logps(self, params, frozen, batch):
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
            return rollout.token_logps(self._model(params, frozen), batch, self.gcfg.temperature,
                                       self.gcfg.logp_chunk)

    def _update(self, state, batch, adv, old, ref):
        g = self.gcfg
        params, frozen = state["params"], state["frozen"]
        use_dropout = self.run.lora is not None and self.run.lora.dropout > 0
        key = jax.random.wrap_key_data(state["rng"])

        def loss_fn(p):
            with dropout_key(key if use_dropout else None):
                lp = self._logps(p, frozen, batch)
            return grpo_loss(lp, old, ref, adv, batch["mask"], beta=g.beta, epsilon_low=g.epsilon_low,
                             epsilon_high=g.epsilon_high, loss_type=g.loss_type,
                             max_completion_length=g.max_new_tokens)

        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old_: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old_)  # never apply a bad update
        rng = jax.random.key_data(jax.random.split(key)[0])
        new_state = {**state, "step": state["step"] + 1, "params": keep(new_params, params),
                     "opt_state": keep(opt_state, state["opt_state"]), "rng": rng}
        return new_state, {"loss": loss, "grad_norm": grad_norm, **m}

    def device_batch(self, batch: dict) -> dict:
        """Rows split over data x fsdp when they divide evenly, else replicated; audio replicated."""
        n = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        b = batch["input_ids"].shape[0]
        rows = NamedSharding(self.mesh, P(BATCH_AXES)) if b % n == 0 else self.replicated
        if b % n and not getattr(self, "_warned_rows", False):
            self._warned_rows = True  # every chip then computes every row: n times the work and memory
            log.warning("%d rollout rows (prompts_per_step x num_generations) do not divide over data x fsdp = %d: "
                        "the update's rows are replicated, not split; make P x G a multiple of %d", b, n, n)
        return {k: jax.device_put(v, rows if k in ROW_KEYS else self.replicated) for k, v in batch.items()}

    def policy(self, state):
        """The policy as an nnx model over the state's own arrays (what the engine reads)."""
        return nnx.merge(self.graphdef, combine(state["params"], state["frozen"]))


# -- the loop --------------------------------------------------------------------------------------


def _generator(model, gcfg: GRPOConfig, cfg: TrainConfig, stops, mesh=None):
    from mufun_jax.engine import Generator

    # the training mesh: the KV cache is created sharded on it (as mufun_jax.grpo.aot compiles it)
    return Generator(model, max_new_tokens=gcfg.max_new_tokens, batch_size=gcfg.rollout_batch,
                     buckets=(cfg.data.seq_len,), eos_token_id=stops, max_chunks=cfg.data.max_chunks, mesh=mesh)


def _texts(tokenizer, comps, stops):
    return [rollout.decode(tokenizer, c, stops) for c in comps]


def _fields(prompts, groups: int) -> dict:
    keys = sorted({k for p in prompts for k in p.fields})
    return {k: [p.fields.get(k) for p in prompts for _ in range(groups)] for k in keys}


def evaluate(gen, source, gcfg: GRPOConfig, tokenizer, stops) -> dict:
    """Greedy answers to the held-out prompts, scored by every reward: ``eval/reward/<name>``."""
    n = len(source) if gcfg.eval_prompts is None else min(gcfg.eval_prompts, len(source))
    prompts = [source.prompt(i) for i in range(n)]
    reqs = [rollout.Request(p.ids, p.chunks, audio_keys=p.keys) for p in prompts]
    comps = [None] * n
    for i, o in gen.stream(reqs, max_new_tokens=gcfg.max_new_tokens):
        comps[i] = o.token_ids
    texts = _texts(tokenizer, comps, stops)
    per, total = rewards_lib.score(gcfg.rewards, [p.text for p in prompts], texts, _fields(prompts, 1))
    out = {f"eval/reward/{s.name}": float(np.nanmean(v)) for s, v in zip(gcfg.rewards, per)}
    out["eval/reward"] = float(np.mean(total))
    return out


def train(cfg: TrainConfig, *, profile: bool = False, on_step: Callable[[int, dict], None] | None = None,
          force: bool = False) -> dict:
    """Run (or resume) GRPO as configured (``recipe: grpo``); returns the last step's metrics."""
    from tqdm.auto import tqdm

    from mufun_jax.data.dataset import dataset_tokenizer

    gcfg = GRPOConfig.from_dict(cfg.grpo)
    maybe_initialize_distributed(cfg.distributed)
    run_dir.check_inputs(cfg)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    model_cfg = cfg.model_config()
    tokenizer = dataset_tokenizer(cfg.data.tokenizer or cfg.init_from)
    main = jax.process_index() == 0
    out = run_dir.prepare(cfg, force=force, write=main)
    trainer = GRPOTrainer(cfg, model_cfg, mesh, gcfg)
    d = cfg.data
    source = rollout.PromptSource(d.dataset, tokenizer, template=d.template, audio_root=d.audio_root, seed=d.seed,
                                  tasks=gcfg.tasks)
    held_out = (rollout.PromptSource(d.eval_dataset, tokenizer, template=d.template, audio_root=d.audio_root,
                                     seed=d.seed, tasks=gcfg.tasks) if d.eval_dataset and gcfg.eval_every else None)
    mngr = run_dir.train_checkpoint_manager(cfg.output_dir, cfg.keep, cfg.async_checkpointing)
    start = mngr.latest_step()
    key = jax.random.key(cfg.seed)
    if start is not None:
        state, _ = run_dir.restore_train_state(mngr, start, trainer.abstract_checkpoint())
        need_init = bool(trainer.state_shardings["frozen"]) or bool(trainer.ref_paths)
        params = load_init_params(trainer, cfg.init_from) if cfg.init_from and need_init else None
        state["frozen"] = trainer.init_frozen(key, params)
        if trainer.ref_paths:
            state["ref"] = trainer.ref_copy(trainer._params(key, params, part=0))
        del params
        log.info("resumed from %s at step %d", out / "checkpoints" / str(start), start)
    else:
        start = 0
        params = load_init_params(trainer, cfg.init_from) if cfg.init_from else None
        state = trainer.init_state(key, params)
        del params
    if main:
        run_dir.write_config(out, cfg)
    stops = rollout.stop_ids(tokenizer, d.template)
    gen = _generator(trainer.policy(state), gcfg, cfg, stops, mesh)
    local = Path(cfg.output_dir) if "://" not in cfg.output_dir else Path("logs") / Path(cfg.output_dir).name
    writer = MetricsWriter(local, enabled=main)
    bar = tqdm(total=cfg.max_steps, initial=start, desc="grpo", disable=not (cfg.progress and main), unit="step")
    G, Pn = gcfg.num_generations, gcfg.prompts_per_step
    metrics: dict = {}
    step = start
    watch = PreemptionWatch()
    try:
        if held_out is not None and start == 0:
            writer.write(0, evaluate(gen, held_out, gcfg, tokenizer, stops))
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            prompts = source.batch(step, Pn)
            comps = rollout.generate(gen, rollout.requests(prompts, step, gcfg, cfg.seed))
            gen._cache = None  # free the decode slots' KV cache (GiBs per chip at 8B) before the update
            texts = _texts(tokenizer, comps, stops)
            per, total = rewards_lib.score(gcfg.rewards, [p.text for p in prompts for _ in range(G)], texts,
                                           _fields(prompts, G))
            adv, std = advantages(total, G, gcfg.scale_rewards)
            batch = trainer.device_batch(rollout.build_batch(
                prompts, comps, G, tokens_per_chunk=model_cfg.tokens_per_chunk, max_new_tokens=gcfg.max_new_tokens,
                pad_id=gen.pad_token_id, buckets=(d.seq_len + gcfg.max_new_tokens,)))
            ref = trainer.ref_logps(state, batch) if gcfg.beta > 0 else None
            old = trainer.logps(state, batch) if gcfg.num_iterations > 1 else None
            t1 = time.perf_counter()
            adv_d = jax.device_put(jnp.asarray(adv), trainer.replicated)
            ms = []
            for _ in range(gcfg.num_iterations):
                state, m = trainer.update(state, batch, adv_d, old, ref)
                ms.append(m)
            ms = [{k: float(v) for k, v in jax.device_get(m).items()} for m in ms]
            gen.model = trainer.policy(state)  # the new weights, same arrays; cached prefixes are stale
            gen.clear_caches()
            t2 = time.perf_counter()
            step += 1
            m = {k: float(np.mean([x[k] for x in ms])) for k in ms[0]}
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                raise NonFiniteLossError(f"step {step}: loss={m['loss']} grad_norm={m['grad_norm']} is not finite; "
                                         f"the update was not applied. The last good checkpoint is step "
                                         f"{mngr.latest_step()}. Lower optim.lr or use dtype=float32.")
            m.update({f"reward/{s.name}": float(np.nanmean(v)) for s, v in zip(gcfg.rewards, per)})
            m.update({"reward": float(np.mean(total)), "reward_std": float(np.mean(std)),
                      "frac_reward_zero_std": float(np.mean(std == 0)),
                      "completion_length": float(np.mean([len(c) for c in comps])),
                      "rollout_s": t1 - t0, "update_s": t2 - t1,
                      "lr": float(trainer.schedule(step * gcfg.num_iterations - 1))})
            metrics = m
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                writer.write(step, m)
                bar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m['kl']:.4f}", refresh=False)
            bar.update(1)
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                _save(mngr, step, state)
            if held_out is not None and (step % gcfg.eval_every == 0 or step == cfg.max_steps):
                writer.write(step, evaluate(gen, held_out, gcfg, tokenizer, stops))
            if on_step is not None:
                on_step(step, m)
            if watch.reached(step):
                if mngr.latest_step() != step:
                    _save(mngr, step, state)
                mngr.wait_until_finished()
                bar.close()
                took = time.perf_counter() - watch.signal_at
                log.warning("preempted: the checkpoint of step %d is committed (%.1f s after the notice); exiting "
                            "with status %d: run the same command again to resume", step, took, EXIT_PREEMPTED)
                return {"step": step, **metrics, "preempted": True, "notice_to_commit_s": took}
        bar.close()
        if mngr.latest_step() != step:
            _save(mngr, step, state)
        mngr.wait_until_finished()
        export_model(state, model_cfg, tokenizer, out / "model", trainer.run)
    finally:
        watch.close()
        bar.close()
        writer.close()
        mngr.close()
    return {"step": step, **metrics}


def _save(mngr, step: int, state: dict) -> None:
    """The state without the reference copy (rebuilt on resume) or frozen modules; the prompt
    position is the step itself."""
    run_dir.save_train_state(mngr, step, {k: v for k, v in state.items() if k != "ref"}, {"step": step})
