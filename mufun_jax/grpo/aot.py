"""AOT-compile a GRPO step for a TPU topology on this host (needs libtpu, no TPU):
``python -m mufun_jax.grpo.aot --config configs/mufun8b_grpo_lora.yaml --topology v6e-8 [KEY=VALUE ...]``.

A GRPO step is two kinds of program, and both must fit on the slice at once (the engine reads the
policy's own arrays, so the weights are resident once):

- ``update``: ``GRPOTrainer.update`` (the jitted function a run calls) on P x G rows of
  ``data.seq_len + max_new_tokens`` tokens, the whole rollout batch in one optimizer update, with
  the reference's log-probs (beta > 0) and old log-probs (mu > 1) as inputs;
- the rollout programs (``--rollout``): the engine's ``encode``, ``prefix``, ``prefill`` and
  ``decode``, compiled through :func:`mufun_jax.aot.drivers.compile_infer` (a real ``Generator`` on
  the abstract model) with ``grpo.rollout_batch`` slots over ``data.seq_len + max_new_tokens``
  positions, on the training mesh. That abstract model has no LoRA adapters: a rank-16 adapter adds
  under 1 % to the weights.

Each 8B program takes minutes to compile on a CPU host.
"""

from __future__ import annotations

import os
import sys

# none of these imports jax: the platform is chosen in main(), before jax is first imported
from mufun_jax.aot.drivers import AotResult, compile_infer, compile_step, report, train_model_config
from mufun_jax.aot.topology import Topology, get_topology, topology_mesh
from mufun_jax.train_config import TrainConfig


def compile_update(cfg: TrainConfig, topology: str | Topology, *, chunks_per_prompt: int = 2) -> AotResult:
    """``GRPOTrainer.update`` on abstract state and a rollout batch of the config's P x G rows
    (``chunks_per_prompt`` 30 s chunks of audio per prompt)."""
    # jax, and the trainer that imports it, only here: main() sets JAX_PLATFORMS first (read on import)
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from mufun_jax import audio
    from mufun_jax.grpo.config import GRPOConfig
    from mufun_jax.grpo.trainer import ROW_KEYS, GRPOTrainer
    from mufun_jax.train_lib import BATCH_AXES

    gcfg = GRPOConfig.from_dict(cfg.grpo)
    topo = topology if isinstance(topology, Topology) else get_topology(topology)
    model_cfg = train_model_config(cfg)
    mesh = topology_mesh(topo, cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    trainer = GRPOTrainer(cfg, model_cfg, mesh, gcfg)
    state = trainer.abstract_state()
    n, t, k = gcfg.prompts_per_step * gcfg.num_generations, cfg.data.seq_len + gcfg.max_new_tokens, gcfg.max_new_tokens
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    rows_sh = NamedSharding(mesh, PartitionSpec(BATCH_AXES)) if n % split == 0 else trainer.replicated
    chunks = 1 << max(gcfg.prompts_per_step * chunks_per_prompt - 1, 0).bit_length()  # as build_batch pads
    shapes = {"input_ids": (n, t), "audio_slots": (n, t), "positions": (n, t), "segment_ids": (n, t),
              "gather": (n, k), "targets": (n, k), "mask": (n, k), "waves": (chunks, audio.CHUNK_SAMPLES)}
    dtype = {"mask": jnp.bool_, "waves": jnp.float32}
    batch = {name: jax.ShapeDtypeStruct(s, dtype.get(name, jnp.int32),
                                        sharding=rows_sh if name in ROW_KEYS else trainer.replicated)
             for name, s in shapes.items()}
    per_token = jax.ShapeDtypeStruct((n, k), jnp.float32, sharding=rows_sh)
    adv = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=trainer.replicated)
    old = per_token if gcfg.num_iterations > 1 else None
    ref = per_token if gcfg.beta > 0 else None
    r = AotResult("update", topo.name, topo.num_slices, topo.chips, dict(mesh.shape), topo.hbm_bytes, False)
    r.tokens = n * t
    r.detail = (f"P {gcfg.prompts_per_step} x G {gcfg.num_generations} = {n} rows x {t} tokens "
                f"({cfg.data.seq_len} prompt + {k} new), {chunks} audio chunks; trainable {cfg.trainable}; "
                f"beta {gcfg.beta}, mu {gcfg.num_iterations}; remat {cfg.run.remat_policy}; "
                f"logp_chunk {gcfg.logp_chunk}")
    compile_step(r, trainer.update, (state, batch, adv, old, ref), mesh)
    return r


def compile_rollout(cfg: TrainConfig, topology: str | Topology, *, chunks_per_prompt: int = 2) -> list[AotResult]:
    """The engine's programs for the config's rollouts, on the training mesh."""
    gcfg_d = dict(cfg.grpo or {})
    slots = int(gcfg_d.get("rollout_batch", 32))
    new = int(gcfg_d.get("max_new_tokens", 64))
    return compile_infer(topology, batch=slots, context=cfg.data.seq_len, new_tokens=new,
                         chunks_per_row=chunks_per_prompt, model_cfg=train_model_config(cfg),
                         mesh_shape=(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor))


def main(argv=None) -> int:
    from mufun_jax.cli_base import ArgumentParser

    ap = ArgumentParser(prog="python -m mufun_jax.grpo.aot", description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--topology", required=True, help="v6e-8, v5p-64, ...")
    ap.add_argument("--chunks-per-prompt", type=int, default=2, help="30 s audio chunks per prompt")
    ap.add_argument("--rollout", action="store_true", help="also compile the engine's rollout programs")
    ap.add_argument("--no-update", action="store_true", help="skip the update step")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling only: never take a local TPU
    cfg = TrainConfig.load(args.config, args.overrides)
    results = [] if args.no_update else [compile_update(cfg, args.topology, chunks_per_prompt=args.chunks_per_prompt)]
    if args.rollout:
        results += compile_rollout(cfg, args.topology, chunks_per_prompt=args.chunks_per_prompt)
    return report(results, "python -m mufun_jax.grpo.aot")


if __name__ == "__main__":
    sys.exit(main())
