"""Multi-process training on one machine: two CPU processes joined by ``jax.distributed.initialize``
(gloo collectives), each with 2 CPU devices, against one process with 4 devices.

Each host packs its own samples with host-local audio slot numbers, exactly as the data loader of
each host does, and hands ``Trainer.global_batch`` only its own rows and chunks; the one-process run
gets the same global batch with globally numbered slots. Without the renumbering in
``Trainer.global_batch`` the second host's rows would splice the first host's audio.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import SMALL_MODEL, tiny_train_data

ROOT = Path(__file__).resolve().parents[1]

# Several processes joined by jax.distributed, each compiling: `make test-all` only.
pytestmark = pytest.mark.slow

WORKER = textwrap.dedent(r"""
    import json, os, sys
    pid, nproc, port, ndev, out = sys.argv[1:6]
    pid, nproc, ndev = int(pid), int(nproc), int(ndev)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    if nproc > 1:
        jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc, process_id=pid,
                                   initialization_timeout=120)
    import jax.numpy as jnp
    import numpy as np
    from mufun_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from mufun_jax.data.dataset import Sample
    from mufun_jax.data.packing import PackConfig, pack_batches
    from mufun_jax.sharding import make_mesh
    from mufun_jax.train_config import TrainConfig
    from mufun_jax.train_lib import BATCH_KEYS, Trainer

    assert jax.process_count() == nproc and jax.device_count() == 4, (jax.process_count(), jax.devices())
    ROWS, CHUNKS, SEQ, ACCUM = 4, 4, 384, 2
    cfg = TrainConfig.from_dict(dict(
        model={"preset": "mufun-tiny"}, max_steps=2, optim=dict(lr=1e-3, warmup_ratio=0.0, grad_accum=ACCUM),
        data=dict(batch_size=ROWS, seq_len=SEQ, max_chunks=CHUNKS), mesh=dict(data=1, fsdp=-1, tensor=1)))
    trainer = Trainer(cfg, cfg.model_config(), make_mesh(1, -1, 1))

    rng = np.random.default_rng(0)
    def sample(i):
        q = [int(x) for x in rng.integers(1, 512, int(rng.integers(3, 8)))]
        a = [int(x) for x in rng.integers(1, 512, int(rng.integers(2, 6)))]
        chunks = [[(0.1 * rng.standard_normal(int(rng.integers(8000, 24000)))).astype(np.float32)]]
        return Sample(f"s{i}", q[:2] + [IMAGE_TOKEN_INDEX] + q[2:] + a, [IGNORE_INDEX] * (len(q) + 1) + a, chunks)
    samples = [sample(i) for i in range(64)]

    # as the loader does, each host packs its own shard of the samples with host-local chunk
    # numbering (slots count from its own first chunk); the one-process run gets the intended
    # global batch: the hosts' rows and chunks concatenated, host h's slots pointing at host h's chunks
    hosts = 2
    pack = PackConfig(batch_size=ROWS // hosts, seq_len=SEQ, max_chunks=CHUNKS // hosts)
    parts = [list(pack_batches(samples[h::hosts], pack))[:2 * ACCUM + 1] for h in range(hosts)]

    def host_batch(i):
        if nproc > 1:
            return {k: parts[pid][i][k] for k in BATCH_KEYS}
        glob = {k: np.concatenate([p[i][k] for p in parts]) for k in BATCH_KEYS}
        glob["audio_slots"] = np.concatenate([
            np.where(p[i]["audio_slots"] >= 0, p[i]["audio_slots"] + h * (CHUNKS // hosts) * 300, -1)
            for h, p in enumerate(parts)])
        return glob

    checksum = jax.jit(lambda p: sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(p)),
                       out_shardings=trainer.replicated)
    result = {}
    state = trainer.init_state(jax.random.key(0))
    losses = []
    for step in range(2):
        state, m = trainer.train_step(state, trainer.global_batch(
            [host_batch(step * ACCUM + i) for i in range(ACCUM)]))
        losses.append(float(m["loss"]))
    result["train"] = {"losses": losses, "checksum": float(checksum(state["params"])),
                       "tokens": float(m["label_tokens"])}
    s, n = trainer.eval_step(state, trainer.global_eval_batch(host_batch(2 * ACCUM)))
    result["hosts"] = {"loss_sum": float(s), "tokens": float(n)}
    with open(f"{out}.{pid}", "w") as f:
        json.dump(result, f)
    print("WORKER_OK", pid, result)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], dict]:
    """(results of processes 0 and 1 of the two-process run, result of the one-process run)."""
    tmp_path = tmp_path_factory.mktemp("multihost")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    out = tmp_path / "result"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), "2", str(port), "2", str(out)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    single = subprocess.run([sys.executable, "-c", WORKER, "0", "1", "0", "4", str(out) + ".single"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0 and "WORKER_OK" in log, f"process {i}:\n{log[-4000:]}"
    assert single.returncode == 0, single.stdout + single.stderr[-4000:]
    two = [json.loads(Path(f"{out}.{i}").read_text()) for i in range(2)]
    return two, json.loads(Path(f"{out}.single.0").read_text())


def test_two_processes_train_like_one(runs):
    """Two train steps (2 micro-batches each) on 2 processes x 2 devices == 1 process x 4 devices."""
    (p0, p1), one = [r["train"] for r in runs[0]], runs[1]["train"]
    assert p0 == p1  # replicated metrics and the parameter checksum agree across processes
    assert p0["tokens"] == one["tokens"]
    for a, b in zip(p0["losses"], one["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (p0["losses"], one["losses"])
    assert abs(p0["checksum"] - one["checksum"]) <= 1e-5 * abs(one["checksum"]), (p0, one)
    assert p0["losses"][1] != p0["losses"][0]  # the first update was applied


def test_host_packed_eval_batch_splices_its_own_audio(runs):
    """The eval path (``global_eval_batch``) renumbers host-local slots too: same replicated result
    on both processes, equal to the one-process global batch."""
    (p0, p1), one = [r["hosts"] for r in runs[0]], runs[1]["hosts"]
    assert p0 == p1 and p0["tokens"] == one["tokens"] > 0
    assert abs(p0["loss_sum"] - one["loss_sum"]) <= 1e-5 * abs(one["loss_sum"]), (p0, one)


PREEMPT_WORKER = textwrap.dedent(r"""
    import json, os, signal, sys
    pid, port, cfg_json = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=120)
    from mufun_jax import train_lib
    from mufun_jax.train_config import TrainConfig

    cfg = TrainConfig.from_dict(json.loads(cfg_json))
    # only process 0 gets the notice; JAX's preemption service tells the other one
    hook = (lambda step, m: os.kill(os.getpid(), signal.SIGTERM) if step == 2 else None) if pid == 0 else None
    result = train_lib.train(cfg, on_step=hook)
    print("RESULT", pid, result.get("preempted", False), result["step"], flush=True)
    sys.exit(train_lib.EXIT_PREEMPTED if result.get("preempted") else 0)
""")


def test_preemption_notice_on_one_host_saves_the_same_step_on_both(tmp_path):
    """Two processes train together; one gets SIGTERM after step 2. Both save the same step (the one
    JAX's preemption service agrees on), commit it, and exit with status 75."""

    data = tiny_train_data(tmp_path)
    out = tmp_path / "run"
    cfg = dict(output_dir=str(out), model=dict(SMALL_MODEL), max_steps=8, save_every=4, progress=False,
               optim=dict(lr=1e-3, warmup_ratio=0.0), mesh=dict(data=1, fsdp=-1, tensor=1),
               data=dict(dataset=str(data / "train.json"), tokenizer=str(data / "tok"), batch_size=4, seq_len=512,
                         max_chunks=4))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", PREEMPT_WORKER, str(i), str(port), json.dumps(cfg)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    results = []
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 75, f"process {i}:\n{log[-4000:]}"
        line = next(x for x in log.splitlines() if x.startswith("RESULT"))
        results.append(line.split()[2:])
    assert results[0] == results[1] and results[0][0] == "True", results  # the same step on both hosts
    step = int(results[0][1])
    assert 2 <= step < 8
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == step, saved
