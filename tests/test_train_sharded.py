"""The sharded train step equals the single-device step, on 8 simulated CPU devices (fsdp=8;
data=2 x fsdp=4; fsdp=4 x tensor=2), with gradient accumulation, a frozen module and the chunked loss
(whose chunks depend on the rows per device); with the
Pallas splash kernel (interpret mode) running per shard inside the real train step; and QLoRA."""

import pytest
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(r"""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from helpers import make_samples, small_cfg
    from mufun_jax.data.packing import PackConfig, pack_batches
    from mufun_jax.sharding import make_mesh
    from mufun_jax.train_config import TrainConfig
    from mufun_jax.train_lib import Trainer

    assert jax.device_count() == 8
    cfg = small_cfg()
    tcfg = TrainConfig.from_dict(dict(max_steps=10, trainable={"whisper": "frozen", "connector": "full", "llm": "full"},
                                      optim=dict(lr=1e-3, warmup_ratio=0.0, grad_accum=2, eps=1e-2),
                                      data=dict(batch_size=8, seq_len=400, max_chunks=8), loss_chunk=256))
    batches = list(pack_batches(make_samples(np.random.default_rng(0), 40), PackConfig(batch_size=8, seq_len=400,
                                                                                       max_chunks=8)))
    steps = [batches[0:2], batches[2:4]]
    assert all(len(b["sample_ids"]) == 8 for s in steps for b in s)

    def run(mesh, init, tcfg=tcfg):
        tr = Trainer(tcfg, cfg, mesh)
        state = jax.device_put(init, tr.state_shardings)
        losses = []
        for micro in steps:
            state, m = tr.train_step(state, tr.global_batch(micro))
            losses.append(float(m["loss"]))
        return losses, state

    one = Trainer(tcfg, cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    init = jax.device_get(one.init_state(jax.random.key(0)))
    want_losses, want = run(one.mesh, init)
    want = jax.device_get(want)
    for layout in [(1, 8, 1), (2, 4, 1), (1, 4, 2)]:
        mesh = make_mesh(*layout)
        losses, state = run(mesh, init)
        kernel = state["params"]["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), kernel.sharding.spec
        assert len(kernel.sharding.device_set) == 8
        mu = state["opt_state"][1][0].mu["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"]
        assert mu.sharding == kernel.sharding  # optimizer state sharded like its parameter
        loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, want_losses))
        got = jax.device_get(state)
        p_err = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(got["params"]),
                                                                 jax.tree.leaves(want["params"])))
        print(f"layout data,fsdp,tensor={layout}: loss rel err {loss_err:.1e}, max param diff {p_err:.1e}")
        assert loss_err < 1e-5, (layout, losses, want_losses)
        # eps=1e-2 keeps Adam's g / (|g| + eps) smooth, so rounding in g near 0 is not amplified to ~lr
        assert p_err < 1e-6, (layout, p_err)
    # the Pallas splash kernel (interpreted on CPU) in the real train step: the step traces under
    # its mesh, so the kernel runs per shard in a shard_map, and the step equals the XLA one
    tr = Trainer(tcfg, cfg, make_mesh(1, 4, 2), tcfg.run.replace(attention_impl="splash_interpret"))
    state = jax.device_put(init, tr.state_shardings)
    batch = tr.global_batch(steps[0])
    hlo = tr.train_step.lower(state, batch).as_text()
    assert "manual_computation" in hlo or "shard_map" in hlo
    state, m = tr.train_step(state, batch)
    err = abs(float(m["loss"]) - want_losses[0]) / abs(want_losses[0])
    print(f"splash_interpret on fsdp=4 x tensor=2: loss rel err {err:.1e}")
    assert err < 1e-5, (float(m["loss"]), want_losses[0])
    # QLoRA (LoRA on an int8 base, dropout on) on fsdp=4 x tensor=2 equals the single-device run
    qcfg = TrainConfig.from_dict({**tcfg.to_dict(), "model": {}, "trainable": {"whisper": "frozen", "connector": "full",
                                                                              "llm": "lora"},
                                  "lora": dict(rank=4, alpha=8, dropout=0.1), "quantize": "int8"})
    one = Trainer(qcfg, cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    init = jax.device_get(one.init_state(jax.random.key(0)))
    want_losses, want = run(one.mesh, init, qcfg)
    losses, state = run(make_mesh(1, 4, 2), init, qcfg)
    b = state["params"]["language_model"]["layers"]["mlp"]["gate_proj"]["lora_b"]
    assert b.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor"), b.sharding.spec
    codes = state["frozen"]["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert codes.dtype == np.int8 and codes.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, want_losses))
    got, want = jax.device_get(state), jax.device_get(want)
    p_err = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(got["params"]),
                                                             jax.tree.leaves(want["params"])))
    print(f"QLoRA on fsdp=4 x tensor=2: loss rel err {loss_err:.1e}, max param diff {p_err:.1e}")
    assert loss_err < 1e-5 and p_err < 1e-6, (losses, want_losses, p_err)
    print("SHARDED_TRAIN_OK")
""")


@pytest.mark.slow  # a 4-device subprocess; test_sharding keeps sharded-vs-single parity in the quick tier
def test_sharded_train_steps_equal_single_device():
    # the script imports tests/helpers.py: the repository and tests/ go on its PYTHONPATH
    path = [str(ROOT), str(ROOT / "tests")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(r.stdout)
    assert r.returncode == 0 and "SHARDED_TRAIN_OK" in r.stdout, r.stdout + r.stderr[-4000:]
