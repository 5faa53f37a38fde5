"""The engine on a mesh: sharded weights and KV cache on 4 simulated CPU devices give the one-device
answers, no device holds more than its share, and a second pass compiles nothing new."""

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from mufun_jax.config import preset
from mufun_jax.engine import kv_cache_spec

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(r"""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import math
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    jax.config.update("jax_default_matmul_precision", "highest")
    from helpers import small_cfg
    from mufun_jax.config import IMAGE_TOKEN_INDEX as AUDIO
    from mufun_jax.engine import Generator
    from mufun_jax.generate import Request
    from mufun_jax.models import MuFun
    from mufun_jax.sharding import mesh_from_flag, param_shardings

    assert jax.device_count() == 4
    cfg = small_cfg()
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(16000 * s)).astype(np.float32) for s in (2, 3, 35)]
    reqs = [Request([5, 6, AUDIO, 7] + [8 + i] * (i % 3), [waves[i % 3]], seed=i) for i in range(6)]
    reqs.append(Request([9, 10, 11]))  # text only
    kw = dict(max_new_tokens=6, batch_size=4, buckets=(64, 1024), max_chunks=2, chunk_buckets=(2, 4),
              eos_token_id=(), decode_steps=3)

    def model():
        m = MuFun(cfg, rngs=nnx.Rngs(1))
        head = m.language_model.lm_head.kernel
        head[...] = head[...] * 8.0  # greedy choices far from ties
        return m

    want = Generator(model(), **kw).generate(reqs)
    for flag in ("1,1,2", "2,1,2"):
        mesh = mesh_from_flag(flag)
        m = model()
        nnx.update(m, jax.device_put(nnx.state(m), param_shardings(m, mesh)))
        gen = Generator(m, mesh=mesh, **kw)
        got = gen.generate(reqs)
        for w, g in zip(want, got):
            np.testing.assert_array_equal(w.token_ids, g.token_ids)
            np.testing.assert_allclose(w.logprobs, g.logprobs, rtol=1e-4, atol=1e-4)
        d, t = mesh.shape["data"], mesh.shape["tensor"]
        for x in gen._cache:
            want_sh = NamedSharding(mesh, P(None, "data" if d > 1 else None, "tensor", None, None))
            assert x.sharding.is_equivalent_to(want_sh, x.ndim), x.sharding
            assert max(s.data.nbytes for s in x.addressable_shards) * d * t == x.nbytes
        q = m.language_model.layers.self_attn.q_proj.kernel[...]
        assert max(s.data.nbytes for s in q.addressable_shards) * t == q.nbytes, q.sharding
        compiles = dict(gen.compiles)
        again = gen.generate(reqs)
        assert dict(gen.compiles) == compiles, (compiles, gen.compiles)
        assert [a.token_ids.tolist() for a in again] == [g.token_ids.tolist() for g in got]
        print(flag, "ok", compiles)

    # the same through infer.py's --mesh: every answer (text and length) equals the one-device run's
    import json, sys, tempfile
    from pathlib import Path
    import soundfile as sf
    from helpers import tiny_model_dir
    from mufun_jax.infer_cli import infer_main

    d = Path(tempfile.mkdtemp())
    model_dir = tiny_model_dir(d, ["jazz rock piano guitar drums tempo fast slow"] * 50)
    for i, w in enumerate(waves):
        sf.write(d / f"s{i}.wav", w, 16000)
    questions = ["What genre is this?", "Is it fast?", "Describe it."]
    (d / "in.jsonl").write_text("".join(json.dumps({"id": f"{i}-{q}", "prompt": q, "audio": f"s{i}.wav"}) + "\n"
                                        for i in range(3) for q in questions))
    runs = {}
    for flag in ("1,1,1", "1,1,2", "2,1,2"):
        out = d / f"out{flag.replace(',', '')}.jsonl"
        rc = infer_main([str(model_dir), str(d / "in.jsonl"), "-o", str(out), "--audio-root", str(d), "--mesh", flag,
                         "--batch-size", "4", "--max-new-tokens", "8", "--no-progress"])
        assert rc == 0, rc
        runs[flag] = {r["id"]: (r["answer"], r["num_tokens"]) for r in map(json.loads, out.read_text().splitlines())}
        assert len(runs[flag]) == 9
    assert runs["1,1,2"] == runs["1,1,1"] and runs["2,1,2"] == runs["1,1,1"]
    print("infer.py ok")
""")


@pytest.mark.slow
def test_engine_on_a_mesh_equals_one_device():
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "1,1,2 ok" in r.stdout and "2,1,2 ok" in r.stdout and "infer.py ok" in r.stdout


def test_kv_cache_spec_errors_name_both_numbers():
    cfg = preset("mufun-tiny")  # 4 attention heads, 2 kv heads
    mesh = lambda d, t: types.SimpleNamespace(shape={"data": d, "fsdp": 1, "tensor": t})
    with pytest.raises(ValueError, match="tensor=3 must divide the model's 2 kv heads and 4 attention heads"):
        kv_cache_spec(cfg, mesh(1, 3), 8)
    with pytest.raises(ValueError, match="data=3 must divide the 8 decode slots"):
        kv_cache_spec(cfg, mesh(3, 1), 8)
    assert tuple(kv_cache_spec(cfg, mesh(2, 2), 8)) == (None, "data", "tensor", None, None)
