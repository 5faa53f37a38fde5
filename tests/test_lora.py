"""LoRA and QLoRA training: only adapters (and fully trained modules) train and get optimizer
state, the quantised base stays frozen, dropout draws distinct masks, checkpoints hold no frozen
weights and resume exactly, the NaN guard holds, the export merges the adapters, and bad settings
are clear errors. (PEFT parity of the exported adapters: tests/test_peft.py; the sharded LoRA step:
tests/test_train_sharded.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mufun_jax.config import LoraConfig, RunSettings
from mufun_jax.data.packing import PackConfig, pack_batches
from mufun_jax.models import MuFun, lora
from mufun_jax.models.layers import Linear, apply_lora
from mufun_jax.train_config import TrainConfig
from mufun_jax.train_lib import Trainer, combine, export_model
from helpers import CFG, committed, losses, make_samples, one_device_mesh, run_config as config, run_train as run, train_cfg

LORA_TRAINABLE = {"whisper": "frozen", "connector": "full", "llm": "lora"}


def leaf_names(tree) -> set[str]:
    return {str(path[-1].key) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_only_adapters_train_and_the_base_stays_frozen(quantize="nf4"):
    rng = np.random.default_rng(3)
    batches = list(pack_batches(make_samples(rng, 8), PackConfig(batch_size=2, seq_len=700, max_chunks=4)))
    cfg = train_cfg(trainable=LORA_TRAINABLE, lora=dict(rank=4, alpha=8, dropout=0.1), quantize=quantize)
    tr = Trainer(cfg, CFG, one_device_mesh())
    state = tr.init_state(jax.random.key(0))
    assert leaf_names(state["params"]["language_model"]) == {"lora_a", "lora_b"}
    assert set(state["params"]) == {"connector", "language_model"}
    frozen_llm = state["frozen"]["language_model"]["layers"]["mlp"]["gate_proj"]
    if quantize:
        assert frozen_llm["kernel"].dtype == jnp.uint8 and "kernel_scale" in frozen_llm
        assert state["frozen"]["encoder"]["layers"]["fc1"]["kernel"].dtype == jnp.uint8  # frozen Whisper too
    n_train = sum(x.size for x in jax.tree.leaves(state["params"]))
    opt = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
    assert sum(x.size for x in opt) == 2 * n_train  # Adam's mu and nu: adapters + connector only
    frozen0 = jax.tree.map(np.asarray, state["frozen"])
    b0 = np.asarray(state["params"]["language_model"]["layers"]["mlp"]["down_proj"]["lora_b"])
    assert not b0.any()  # B starts at zero: a fresh adapter changes nothing
    for b in batches[:2]:
        state, m = tr.train_step(state, tr.global_batch([b]))
        assert np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(state["frozen"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert np.asarray(state["params"]["language_model"]["layers"]["mlp"]["down_proj"]["lora_b"]).any()
    # the NaN guard: a non-finite loss applies no update to the adapters either
    bad = dict(batches[0])
    bad["waves"] = np.full_like(bad["waves"], np.nan)
    before = jax.tree.map(np.asarray, state["params"])
    state, m = tr.train_step(state, tr.global_batch([bad]))
    assert not np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_dropout_masks_differ_by_key_layer_and_projection():
    lin = Linear(16, 8, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    apply_lora(nnx.Dict(q_proj=lin), LoraConfig(rank=4, alpha=4, dropout=0.5, targets=("q_proj",)), "llm", nnx.Rngs(1))
    lin.lora_b[...] = jax.random.normal(jax.random.key(2), lin.lora_b.shape)
    x = jnp.ones((3, 16))
    y_eval = lin(x)
    with lora.dropout_key(jax.random.key(0)):
        y0, y0_again = lin(x), lin(x)
    with lora.dropout_key(jax.random.key(1)):
        y1 = lin(x)
    np.testing.assert_array_equal(y0, y0_again)  # the same key: the same mask
    assert not np.allclose(y0, y_eval) and not np.allclose(y0, y1)
    # without a key (eval, inference) the adapter is deterministic and equals the closed form
    want = x @ lin.kernel[...] + lin.bias[...] + (x @ lin.lora_a[...]) @ lin.lora_b[...] * lin.lora_scaling
    np.testing.assert_allclose(y_eval, want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # cost in the quick tier; test_peft keeps the adapter export and merge quick
def test_export_merges_the_adapters(tmp_path, quantize="int8"):
    """train.py's export (OUTPUT_DIR/model) holds plain weights with the adapters merged in (and a
    quantised base dequantised): loaded back it gives the adapted model's logits."""
    from mufun_jax.loading import load_model

    cfg = train_cfg(trainable=LORA_TRAINABLE, lora=dict(rank=4, alpha=8), quantize=quantize)
    tr = Trainer(cfg, CFG, one_device_mesh())
    state = tr.init_state(jax.random.key(0))
    state["params"] = jax.tree_util.tree_map_with_path(
        lambda p, a: jax.random.normal(jax.random.key(len(str(p))), a.shape, a.dtype) * 0.05
        if str(p[-1].key) == "lora_b" else a, state["params"])
    adapted = nnx.merge(tr.graphdef, combine(state["params"], state["frozen"]))
    export_model(state, CFG, None, tmp_path / "model", tr.run)
    merged = load_model(tmp_path / "model")
    assert not leaf_names(nnx.to_pure_dict(nnx.state(merged))) & {"lora_a", "lora_b", "kernel_scale"}
    ids = jnp.asarray(np.random.default_rng(0).integers(1, CFG.qwen3.vocab_size, (2, 24)))
    want, _ = adapted(ids)
    got, _ = merged(ids)
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    print(f"merged export vs adapted model ({quantize or 'float'} base): max |logit diff| {err:.1e} (relative)")
    assert err <= 1e-5


@pytest.mark.slow
def test_lora_qlora_run_resumes_exactly_and_checkpoints_hold_no_frozen_weights(tiny_data, tmp_path):
    """QLoRA through train(): SIGKILL after step 3, restart, and the logged losses equal an
    uninterrupted run's bit for bit (dropout on, so the masks are reproduced too). A checkpoint
    holds the step, the adapters + connector, their optimizer state and the RNG, nothing frozen."""
    import signal

    import orbax.checkpoint as ocp

    from mufun_jax import train_lib

    kw = dict(max_steps=4, trainable=LORA_TRAINABLE, quantize="int8", lora=dict(rank=4, alpha=8, dropout=0.1))
    base = tmp_path / "base"
    train_lib.train(TrainConfig.from_dict(config(tiny_data, base, **kw)))  # uninterrupted: in this process
    want = dict(losses(base))
    assert sorted(want) == [1, 2, 3, 4]
    out = tmp_path / "run"
    r = run(config(tiny_data, out, **kw), "kill_after_step", 3, expect_ok=False)
    assert r.returncode == -signal.SIGKILL and committed(out) == [2]
    run(config(tiny_data, out, **kw))
    got = losses(out)
    assert [s for s, _ in got] == [1, 2, 3, 3, 4]
    for step, loss in got:
        assert loss == want[step], (step, loss, want[step])
    saved = ocp.StandardCheckpointer().metadata(out / "checkpoints" / "4" / "state")
    tree = saved.item_metadata.tree if hasattr(saved, "item_metadata") else saved.tree
    assert set(tree) == {"step", "params", "opt_state", "rng"}
    assert leaf_names(tree["params"]["language_model"]) == {"lora_a", "lora_b"}
    assert set(tree["params"]) == {"connector", "language_model"}
    assert (out / "model" / "mufun_config.json").exists()


def test_bad_lora_settings_are_clear_errors():
    with pytest.raises(ValueError, match="lora.rank=0"):
        train_cfg(trainable=LORA_TRAINABLE, lora=dict(rank=0))
    with pytest.raises(ValueError, match=r"lora.targets=\['qkv'\].*unknown \['qkv'\]"):
        train_cfg(trainable=LORA_TRAINABLE, lora=dict(targets=["qkv"]))
    with pytest.raises(ValueError, match="lora.dropout=1.0"):
        LoraConfig(dropout=1.0)
    # fc1 is a Whisper layer: the LLM has no linear layer of that name
    with pytest.raises(ValueError, match="match no linear layer of module 'llm'"):
        MuFun(CFG, RunSettings(lora=LoraConfig(rank=2, targets=("fc1",)), lora_modules=("llm",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="trainable=.*bad: {'llm': 'qlora'}"):
        TrainConfig.from_dict(dict(trainable={"llm": "qlora"}))
    with pytest.raises(ValueError, match="quantize='int4' is not one of"):
        train_cfg(trainable=LORA_TRAINABLE, quantize="int4")
    with pytest.raises(ValueError, match="every module trains in full"):
        train_cfg(quantize="int8")
