"""Logical axes on every parameter, the rule table, and sharded == unsharded on 8 simulated devices."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mufun_jax.config import preset
from mufun_jax.models import MuFun
from mufun_jax.sharding import DEFAULT_RULES, logical_to_spec

ROOT = Path(__file__).resolve().parents[1]


def test_every_variable_has_logical_axes_of_its_rank():
    model = nnx.eval_shape(lambda: MuFun(preset("mufun-8b"), rngs=nnx.Rngs(0)))
    known = dict(DEFAULT_RULES)
    n = 0
    for path, v in nnx.iter_graph(model):
        if isinstance(v, nnx.Variable):
            axes = v.get_metadata("logical_axes", None)
            assert axes is not None and len(axes) == len(v.shape), (path, axes, v.shape)
            assert all(a in known for a in axes), (path, axes)
            if ".".join(map(str, path)).count("layers") and "embed_positions" not in path:
                assert axes[0] == "layers", path
            n += 1
    assert n > 30


def test_rules_map_to_mesh_axes():
    assert logical_to_spec(("layers", "embed", "mlp")) == P(None, "fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_to_spec(("batch", "embed")) == P(("data", "fsdp"), None)  # fsdp used once per array
    with pytest.raises(ValueError, match="'nonsense'"):
        logical_to_spec(("nonsense",))


SCRIPT = textwrap.dedent(r"""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    jax.config.update("jax_default_matmul_precision", "highest")
    from mufun_jax.config import preset
    from mufun_jax.models import MuFun
    from mufun_jax.sharding import make_mesh, param_shardings
    from mufun_jax.splice import SpliceSample, collate

    assert jax.device_count() == 8, jax.devices()
    cfg = preset("mufun-tiny")
    model = MuFun(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    samples = [SpliceSample([*rng.integers(1, 500, 3), -200, *rng.integers(1, 500, 4 + i)], [1]) for i in range(8)]
    batch = collate(samples, num_chunks=8, tokens_per_chunk=cfg.tokens_per_chunk, max_length=4096, pad_token_id=0,
                    pad_to=320)
    mel = rng.uniform(-1, 1, (8, 128, 3000)).astype(np.float32)

    def fwd(state, b, mel):
        m = nnx.merge(graphdef, state)
        return m(b["input_ids"], mel, b["audio_slots"], positions=b["positions"], segment_ids=b["segment_ids"])[0]

    want = np.asarray(jax.jit(fwd)(state, batch, mel))
    for layout in [(1, 8, 1), (2, 4, 1), (1, 4, 2)]:
        mesh = make_mesh(*layout)
        sstate = jax.device_put(state, param_shardings(state, mesh))
        spec = sstate["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"][...].sharding.spec
        assert spec == P(None, "fsdp", "tensor"), spec
        data = NamedSharding(mesh, P(("data", "fsdp")))
        sb = jax.device_put(batch, data)
        got = jax.jit(fwd)(sstate, sb, jax.device_put(mel, data))
        assert len(got.sharding.device_set) == 8
        err = float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))
        print(f"layout data,fsdp,tensor={layout}: rel err {err:.2e}")
        assert err <= 1e-5, (layout, err)
    print("SHARDED_OK")
""")


@pytest.mark.slow  # a fresh 8-device process (about 45 s); the rule tests above stay quick
def test_sharded_forward_equals_single_device():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(r.stdout)
    assert r.returncode == 0 and "SHARDED_OK" in r.stdout, r.stdout + r.stderr[-4000:]
