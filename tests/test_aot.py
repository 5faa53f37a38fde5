"""Ahead-of-time compilation for TPU topologies on this CPU host (libtpu, no TPU): the HLO FLOP
counter, out-of-memory reporting, the tiny model's real train step on a 4-chip v5e slice, and the
splash attention wiring that the TPU compile uses (checked on CPU in Pallas interpret mode).

The full-size 8B compiles take minutes each: they live in bench/aot_compile.py, not here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import libtpu  # noqa: E402,F401  (make test installs it in .venv/libtpu; see the Makefile and conftest.py)

from helpers import bench_script  # noqa: E402
from mufun_jax import aot  # noqa: E402
from mufun_jax.config import preset  # noqa: E402
from mufun_jax.train_config import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The suite's persistent compilation cache (conftest) stores these XLA:TPU programs but cannot load
# them without a TPU client: jax warns and compiles them again, as it would without the cache.
pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")


@pytest.fixture(scope="module")
def v5e4():
    return aot.get_topology("v5e-4")


def _compiled(topo, fn, *shapes_specs):
    from jax.sharding import Mesh, NamedSharding

    mesh = Mesh(np.asarray(topo.devices).reshape(-1), ("x",))
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, spec)) for s, spec in shapes_specs]
    return jax.jit(fn).lower(*args).compile()


def test_topologies_resolve():
    assert aot.resolve_topology("v5p-128")[1] == "v5:4x4x4"
    assert aot.resolve_topology("v6e-64")[1:] == ("v6e:8x8", aot.TPU_SPECS["v6e"])
    assert aot.resolve_topology("v5e:2x2")[0] == "v5e"
    with pytest.raises(ValueError, match="unknown TPU topology"):
        aot.resolve_topology("v9-1")


def test_slices_have_their_torus_links_and_fsdp_gathers_are_all_gathers():
    """A v5p cube (4x4x4 and up) is a full 3D torus, v5e/v6e close an axis of 16 chips. Described
    without those links, v5p-128 ran every FSDP weight gather as an all-reduce of a zero-padded
    buffer (twice the ICI bytes); with them XLA emits an all-gather."""
    import re

    from jax.sharding import NamedSharding, PartitionSpec as P

    from mufun_jax.aot.topology import topology_mesh, wraparound

    assert wraparound("v5:4x4x4") == wraparound("v5:4x8x8") == (True, True, True)
    assert wraparound("v5:2x4x4") == (False, False, False)
    assert wraparound("v6e:8x16") == (False, True, False) and wraparound("v5e:16x16") == (True, True, False)
    mesh = topology_mesh(aot.get_topology("v5p-128"), 1, -1, 1)
    args = (jax.ShapeDtypeStruct((4096, 4096), jnp.float32, sharding=NamedSharding(mesh, P("fsdp"))),
            jax.ShapeDtypeStruct((64, 512, 4096), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp"))))
    f = lambda w, x: jnp.sum(jnp.einsum("bsd,df->bsf", x, w.astype(jnp.bfloat16)).astype(jnp.float32))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        text = jax.jit(f).lower(*args).compile().as_text()
    assert re.search(r"bf16\[4096,4096\]\S* all-gather\(", text)
    assert not re.search(r"bf16\[4096,4096\]\S* all-reduce\(", text)


def test_hlo_flops_multiplies_loops_and_reads_tpu_convolutions(v5e4):
    """cost_analysis() counts a scan body once; hlo_flops multiplies by the trip count, and counts
    TPU's batched-matmul-as-dilated-convolution by its real taps."""
    from jax.sharding import PartitionSpec as P

    n = 512

    def scan(a, w):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), a, w)[0].sum()

    def nested(a, w):
        return jax.lax.scan(lambda c, _: (jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), c, w)[0], None),
                            a, None, length=3)[0].sum()

    attn = lambda q, k: jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32).sum()
    cases = [
        (scan, [((n, n), P("x")), ((6, n, n), P())], 6 * 2 * n**3),
        (jax.grad(scan, argnums=1), [((n, n), P("x")), ((6, n, n), P())], 3 * 6 * 2 * n**3),
        (nested, [((n, n), P("x")), ((4, n, n), P())], 3 * 4 * 2 * n**3),
        (attn, [((8, 256, 4, 2, 128), P("x")), ((8, 256, 4, 128), P("x"))], 2 * 8 * 4 * 2 * 256 * 256 * 128),
    ]
    for fn, args, want in cases:
        c = _compiled(v5e4, fn, *args)
        got = aot.hlo_flops(c.as_text())
        assert got.unknown_trip_counts == 0
        assert abs(got.flops * v5e4.chips / want - 1) < 0.01, (fn, got.flops * v5e4.chips, want)
    # why it exists: cost_analysis sees one of the 6 iterations
    assert _compiled(v5e4, scan, *cases[0][1]).cost_analysis()["flops"] * v5e4.chips < cases[0][2] / 5


def test_hlo_bytes_and_collectives_multiply_loops(v5e4):
    """The roofline inputs: HBM bytes read the stacked weights once per scan step (a slice, not
    the whole stack), and collective payloads / ring bytes follow the replica groups."""
    from jax.sharding import PartitionSpec as P

    n = 512
    scan = lambda a, w: jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), a, w)[0].sum()
    got = aot.hlo_flops(_compiled(v5e4, scan, ((n, n), P("x")), ((6, n, n), P())).as_text())
    weights, acts = 6 * n * n * 2, 6 * 2 * (n // 4) * n * 2  # bf16; each step reads and writes a quarter of a
    assert weights <= got.hbm_bytes <= 1.5 * (weights + acts), (got.hbm_bytes, weights, acts)
    # an all-gather of a 4-way sharded (1024, 1024) f32 array: each chip ends with 4 MiB and sends
    # its 1 MiB shard to 3 others
    from jax.sharding import Mesh, NamedSharding

    mesh = Mesh(np.asarray(v5e4.devices).reshape(-1), ("x",))
    arg = jax.ShapeDtypeStruct((1024, 1024), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    c = jax.jit(lambda a: a * 2, out_shardings=NamedSharding(mesh, P())).lower(arg).compile()
    got = aot.hlo_flops(c.as_text())
    total = sum(got.collective_bytes.values())
    assert total == 4 * 2**20 and got.link_bytes == 3 * 2**20, (got.collective_bytes, got.link_bytes)


def test_hlo_group_sizes_of_every_replica_group_syntax():
    from mufun_jax.aot.hlo import _group_size

    assert _group_size("replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add", 8) == 4
    assert _group_size("replica_groups=[2,4]<=[8], dimensions={0}", 8) == 4
    assert _group_size("replica_groups=mesh['axis_0'=4,'axis_1'=16] {'axis_1'}, use_global_device_ids=true", 64) == 16
    assert _group_size("replica_groups=mesh['axis_0'=4,'axis_1'=16] {'axis_0','axis_1'}", 64) == 64
    assert _group_size("replica_groups={}, to_apply=%add", 8) == 8


def test_chunked_loss_keeps_each_devices_rows(v5e4):
    """Loss chunks cut the sequence, so each chip computes its own rows in every chunk. With 3 rows
    of 512 tokens per chip and 512-token chunks there are 3 chunks, and the collectives move about
    5 LM heads (a gather per chunk, the gradient's reduction). Chunks of the flattened tokens (the
    old way) put each of 12 chunks on one chip and all-reduced the head for each: 12 heads."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mufun_jax.aot.topology import topology_mesh
    from mufun_jax.loss import nll_sums

    mesh = topology_mesh(v5e4, 1, -1, 1)
    d, vocab, rows, seq = 512, 8192, 12, 512
    sh = lambda *spec: NamedSharding(mesh, P(*spec))
    args = (jax.ShapeDtypeStruct((d, vocab), jnp.float32, sharding=sh("fsdp")),
            jax.ShapeDtypeStruct((rows, seq, d), jnp.float32, sharding=sh("fsdp")),
            jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=sh("fsdp")))
    loss = lambda w, h, t: nll_sums(lambda x: (x @ w.astype(jnp.bfloat16)).astype(jnp.float32),
                                    h.astype(jnp.bfloat16), t, chunk=seq)[0]
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        c = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    heads = sum(aot.hlo_flops(c.as_text()).collective_bytes.values()) / (d * vocab * 2)
    assert heads <= 6, heads


def test_lm_head_is_gathered_once_before_the_chunked_loss(v5e4):
    """Under FSDP, the loss gets a head already cast to bf16 and gathered (``head_matrix``), so
    XLA does not gather it again in every chunk (forward, remat and backward)."""
    from flax import nnx

    from mufun_jax.aot.topology import topology_mesh
    from mufun_jax.loading import abstract_model, abstract_params
    from mufun_jax.config import RunSettings

    mesh = topology_mesh(v5e4, 1, -1, 1)
    model = abstract_model(preset("mufun-tiny"), RunSettings(dtype="bfloat16"))
    graphdef, state = nnx.graphdef(model), abstract_params(model, mesh)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        compiled = jax.jit(lambda st: nnx.merge(graphdef, st).head_matrix()).lower(state).compile()
    out = compiled.out_info
    assert out.dtype == jnp.bfloat16
    assert "fsdp" not in str(compiled.output_shardings.spec), compiled.output_shardings


def test_fused_loss_reduces_the_head_gradient_once(v5e4):
    """The fused loss sums its head gradient over the chunks on each chip and XLA reduces it across
    chips once, after the loop (one bf16 head): no collective per chunk."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mufun_jax.aot.topology import topology_mesh
    from mufun_jax.loss import fused_nll_sums

    mesh = topology_mesh(v5e4, 1, -1, 1)
    d, vocab, rows, seq = 512, 8192, 12, 512  # 3 chunks per chip
    sh = lambda *spec: NamedSharding(mesh, P(*spec))
    args = (jax.ShapeDtypeStruct((d, vocab), jnp.bfloat16, sharding=sh()),
            jax.ShapeDtypeStruct((rows, seq, d), jnp.bfloat16, sharding=sh("fsdp")),
            jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=sh("fsdp")))
    loss = lambda w, h, t: fused_nll_sums(w, h, t, chunk=seq)[0]
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        c = aot.hlo_flops(jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().as_text())
    assert 0 < sum(c.collective_bytes.values()) <= d * vocab * 2, c.collective_bytes


def test_out_of_memory_is_reported_not_raised():
    from jax.sharding import NamedSharding, PartitionSpec as P

    topo = aot.get_topology("v5e-1")
    mesh = aot.topology_mesh(topo, 1, 1, 1)
    x = jax.ShapeDtypeStruct((4, 2**30), jnp.float32, sharding=NamedSharding(mesh, P()))  # 16 GiB in, 16 out
    r = aot.AotResult("test", topo.name, 1, 1, {}, topo.hbm_bytes, False)
    assert aot.compile_step(r, jax.jit(lambda x: x * 2), (x,), mesh) is None
    assert not r.fits and r.peak_bytes > 16 * aot.GiB and "RESOURCE_EXHAUSTED" in r.detail
    assert "does not fit v5e-1" in aot.not_fitting([r])


@pytest.mark.slow  # a whole TPU compile; the quick tier keeps the smaller AOT tests
def test_tiny_train_step_compiles_for_a_v5e_slice(v5e4):
    """The real Trainer.train_step of the tiny model, splash attention, full remat, chunked loss."""
    from flax import nnx

    from mufun_jax.models import MuFun

    cfg = TrainConfig.from_dict(dict(model={"preset": "mufun-tiny"}, dtype="bfloat16", remat_policy="full",
                                     data=dict(batch_size=4, seq_len=384, max_chunks=4), loss_chunk=256,
                                     optim=dict(grad_accum=2)))
    keep = {}
    # conftest's "highest" would ask Mosaic for fp32 contractions of bf16 operands, which it rejects
    with jax.default_matmul_precision("default"):
        r = aot.compile_train(cfg, v5e4, keep=keep)
    assert r.fits and r.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    # arguments: each chip holds its share of the fp32 params and Adam moments, and its batch shard
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(
        lambda: MuFun(cfg.model_config(), rngs=nnx.Rngs(0))))))
    batch_bytes = 2 * (5 * 4 * 384 * 4 + 4 * 480000 * 4 + 4) / 4
    assert 3 * 4 * n_params / 4 < r.argument_bytes - batch_bytes < 3 * 4 * n_params
    assert r.alias_bytes > 0.9 * (r.argument_bytes - batch_bytes)  # the donated state is reused
    assert 0 < r.temp_bytes < 1 * aot.GiB and r.peak_bytes < r.hbm_bytes
    assert r.peak_bytes == r.argument_bytes + r.output_bytes - r.alias_bytes + r.temp_bytes + r.code_bytes
    assert r.kernel_calls > 0 and "tpu_custom_call" in keep["compiled"].as_text()  # splash, as Pallas kernels
    assert 1.0 < r.flops_ratio < 3.0, r.flops_ratio
    table = aot.format_table([r])
    assert "v5e-4" in table and "1/4/1" in table


def test_8b_model_flops_are_6nd_plus_attention():
    """The shared FLOP formulas (mufun_jax.flops), checked against Qwen3-8B's own arithmetic."""
    from mufun_jax import flops

    cfg = preset("mufun-8b")
    q = cfg.qwen3
    full = {"whisper": "full", "connector": "full", "llm": "full"}
    warm = {"whisper": "frozen", "connector": "full", "llm": "frozen"}
    h, hd = q.hidden_size, q.head_dim
    n_llm = q.num_hidden_layers * (h * hd * (q.num_attention_heads + 2 * q.num_key_value_heads)
                                   + q.num_attention_heads * hd * h + 3 * h * q.intermediate_size) + h * q.vocab_size
    assert 7.5e9 < n_llm < 8.3e9  # Qwen3-8B without the input embedding
    rows, seq = 192, 4096
    attn = 3 * 4 * rows * q.num_hidden_layers * seq * (seq + 1) / 2 * q.num_attention_heads * q.head_dim  # causal
    assert flops.train_flops(cfg, full, 0, [seq] * rows) == pytest.approx(6 * n_llm * rows * seq + attn)
    # warmup: the frozen LLM still runs backward (input gradients) for the connector: 4ND, not 2ND
    assert flops.train_flops(cfg, warm, 0, [seq] * rows) == pytest.approx(4 * n_llm * rows * seq + attn)
    # the LLM trained alone (text only, frozen modules before it): still 6ND, its layers pass input gradients
    llm = {"whisper": "frozen", "connector": "frozen", "llm": "full"}
    assert flops.train_flops(cfg, llm, 0, [seq] * rows) == pytest.approx(6 * n_llm * rows * seq + attn)
    # Whisper counts the layers up to the deepest tap: 32 of 32 for MuFun, 15 with taps ending at 15
    w = flops.forward_flops(cfg, 1, [])["enc_a"]
    short = flops.forward_flops(cfg.replace(taps=(0, 7, 15), connector_type="blp_3i_2x"), 1, [])["enc_a"]
    assert short == pytest.approx(w * 15 / 32)


def test_train_cli_compile_only_needs_a_topology(capsys):
    from mufun_jax.aot.__main__ import main as aot_main
    from mufun_jax.cli import train_main

    with pytest.raises(SystemExit) as e:
        train_main(["--config", str(ROOT / "configs/demo.yaml"), "--compile_only"])
    assert e.value.code == 2 and "--topology" in capsys.readouterr().err
    assert aot_main(["topologies"]) == 0 and "v5p-128" in capsys.readouterr().out


@pytest.mark.slow  # a whole XLA:TPU compile through the CLI (minutes on 2 cores); the quick tier
# compiles the tiny train step for a v5e slice in test_tiny_train_step_compiles_for_a_v5e_slice
def test_train_cli_compiles_a_two_slice_job(tmp_path, capsys):
    """``train.py --compile_only --num_slices 2``: the data axis spans the slices (DCN), fsdp stays
    within a slice, and the tiny model's real step compiles for it."""
    from mufun_jax.cli import train_main

    topo = aot.get_topology("v5e-4", num_slices=2)
    mesh = aot.topology_mesh(topo, 1, -1, 1)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert [{d.slice_index for d in mesh.devices[i].ravel()} for i in range(2)] == [{0}, {1}]
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {preset: mufun-tiny}\ndtype: bfloat16\nremat_policy: full\n"
                      "data: {batch_size: 8, seq_len: 384, max_chunks: 8}\nloss_chunk: 256\n")
    with jax.default_matmul_precision("default"):
        code = train_main(["--config", str(config), "--compile_only", "--topology", "v5e-4", "--num_slices", "2"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "v5e-4 x2" in out.out and "2/4/1" in out.out


@pytest.mark.slow  # a whole XLA:TPU compile through the CLI (minutes on 2 cores); the quick tier
# compiles the tiny train step for a v5e slice in test_tiny_train_step_compiles_for_a_v5e_slice
def test_infer_cli_compiles_prefill_and_decode(tmp_path, capsys):
    """``infer.py --compile_only``: the config comes from the model directory; no requests needed."""
    import json

    from mufun_jax.infer_cli import infer_main

    model = tmp_path / "model"
    (model / "params").mkdir(parents=True)
    (model / "mufun_config.json").write_text(json.dumps(preset("mufun-tiny").to_dict()))
    with jax.default_matmul_precision("default"):
        code = infer_main([str(model), "--compile_only", "--topology", "v5e-4", "--batch-size", "4",
                           "--prefill-batch", "2", "--context", "640", "--max-new-tokens", "64", "--mesh", "2,1,2"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "prefill" in out.out and "decode" in out.out and "v5e-4" in out.out and "encode" in out.out
    assert "admission batch 2 " in out.out  # the run's admission batch is the one compiled
    assert infer_main(["--compile_only", "--topology", "v9-8"]) == 2
    assert "unknown TPU topology" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # requests are needed without --compile_only
        infer_main([str(model)])


def test_compile_only_compiles_the_engines_own_functions(monkeypatch):
    """infer.py --compile-only lowers the jitted functions of a real engine (not a parallel
    composition), with the run's cache sharding; aot/drivers composes no inference program itself."""
    import inspect

    from mufun_jax.aot import drivers
    from mufun_jax.engine import Generator

    seen = []
    monkeypatch.setattr(drivers, "compile_step", lambda r, jitted, args, mesh: seen.append((r.step, jitted, args)))
    keep = {}
    results = drivers.compile_infer("v5e-4", batch=4, context=640, new_tokens=64, prefill_batch=2,
                                    mesh_shape=(2, 1, 2), model_cfg=preset("mufun-tiny"), keep=keep)
    gen = keep["generator"]
    assert isinstance(gen, Generator) and gen.batch_size == 4 and gen.prefill_batch == 2
    programs = {"encode": gen._encode, "prefix": gen._prefix, "prefill": gen._prefill, "decode": gen._decode}
    assert [s for s, _, _ in seen] == list(programs)
    for (step, jitted, args), r in zip(seen, results):
        assert r.program is programs[step]
        assert getattr(jitted, "jitted", jitted) is programs[step]
    cache = seen[3][2][1]  # decode's (state, cache, ...): sharded as the engine creates it
    assert cache.k.shape == (3, 4, 2, 704, 16) and tuple(cache.k.sharding.spec) == tuple(gen.cache_spec)
    src = inspect.getsource(drivers)
    for composed in ("prefix_kv(", "prefill_slots(", "decode_chunk(", "encode_audio("):
        assert composed not in src, composed


WIRING = textwrap.dedent(r"""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    jax.config.update("jax_default_matmul_precision", "highest")
    from mufun_jax.config import RunSettings, preset
    from mufun_jax.models import MuFun
    from mufun_jax.sharding import make_mesh, param_shardings
    from mufun_jax.splice import SpliceSample, collate

    cfg = preset("mufun-tiny")
    graphdef, state = nnx.split(MuFun(cfg, rngs=nnx.Rngs(0)))
    kernel = nnx.graphdef(nnx.eval_shape(lambda: MuFun(cfg, RunSettings(attention_impl="splash_interpret"),
                                                        rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    samples = [SpliceSample([*rng.integers(1, 500, 3), -200, *rng.integers(1, 500, 4 + i)], [1]) for i in range(4)]
    batch = collate(samples, num_chunks=4, tokens_per_chunk=cfg.tokens_per_chunk, max_length=4096, pad_token_id=0,
                    pad_to=320)
    batch["segment_ids"][0, 150:] = np.where(batch["segment_ids"][0, 150:] > 0, 2, 0)  # two samples in row 0
    mel = rng.uniform(-1, 1, (4, 128, 3000)).astype(np.float32)

    def fwd(gd):
        def f(state, b, mel):
            m = nnx.merge(gd, state)
            return m(b["input_ids"], mel, b["audio_slots"], positions=b["positions"], segment_ids=b["segment_ids"])[0]
        return jax.jit(f)

    real = np.asarray(batch["segment_ids"]) != 0
    want = np.asarray(fwd(graphdef)(state, batch, mel))[real]
    mesh = make_mesh(1, 2, 2)  # batch over fsdp, heads over tensor: the kernel runs in a shard_map
    data = NamedSharding(mesh, P(("data", "fsdp")))
    args = (jax.device_put(state, param_shardings(state, mesh)), jax.device_put(batch, data),
            jax.device_put(mel, data))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        f = fwd(kernel)
        hlo = f.lower(*args).as_text()
        got = np.asarray(f(*args))[real]
    assert "manual_computation" in hlo or "shard_map" in hlo
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print("rel err", err)
    assert err < 1e-5, err
    print("WIRING_OK")
""")


def test_splash_attention_in_the_models_under_a_mesh_matches_xla():
    """attention_impl=splash_interpret (the TPU kernel, interpreted on CPU) in Whisper and Qwen3,
    under a 2x2 (fsdp, tensor) mesh where it runs per shard, gives the xla logits."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", WIRING], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "WIRING_OK" in r.stdout, r.stdout + r.stderr[-4000:]


def test_tpu_vs_maxtext_roofline_and_missing_maxtext():
    """bench/tpu_vs_maxtext.py: the roofline arithmetic on a made-up result, and a clear exit 2
    where MaxText is not installed (this venv: make bench-tpu builds the one that has it)."""
    tvm = bench_script("tpu_vs_maxtext")
    tokens = 3 * 4096
    r = tvm.analyse(dict(case="x", side="llm", topology="v5p-128", per_chip=3, remat="full", seq=4096, fits=True,
                         peak_bytes=10 * 2**30, temp_bytes=9 * 2**30, hlo_flops=459e12, kernel_calls=0,
                         hbm_access_bytes=2765e9 * 2, link_bytes=600e9 * 0.5, collective_bytes={"all-gather": 1e9}))
    assert r["compute_s"] == pytest.approx(1.0) and r["memory_s"] == pytest.approx(2.0)
    assert r["ici_s"] == pytest.approx(0.5) and r["step_s"] == pytest.approx(2.5)
    assert r["mfu_bound"] == pytest.approx(r["model_flops"] / (2.5 * 459e12))
    assert r["tokens_per_s_chip"] == pytest.approx(tokens / 2.5)
    assert r["model_flops"] / tokens == pytest.approx(49.0e9, rel=0.01)  # 6ND + attention for Qwen3-8B
    assert "| x | llm | v5p-128 | 3 |" in tvm.table([r])
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "tpu_vs_maxtext.py"), "--cases", "maxtext_v5p_3"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "make bench-tpu" in out.stderr, out.stderr
