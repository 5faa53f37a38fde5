"""Stacked layers run by scan (compile size independent of depth) and remat policies that
change how, not what, the model computes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mufun_jax.config import RunSettings, preset
from mufun_jax.models import MuFun, Qwen3ForCausalLM


def n_eqns(num_layers: int) -> int:
    cfg = dataclasses.replace(preset("mufun-tiny").qwen3, num_hidden_layers=num_layers)
    model = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x)[0])(state, jnp.zeros((1, 8), jnp.int32))
    return len(jaxpr.jaxpr.eqns)


def test_traced_program_does_not_grow_with_depth():
    assert n_eqns(2) == n_eqns(12)


def loss_and_grads(policy: str):
    model = MuFun(preset("mufun-tiny"), RunSettings(remat_policy=policy), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(np.r_[rng.integers(1, 500, 3), np.full(300, -200), rng.integers(1, 500, 5)][None], jnp.int32)
    slots = jnp.asarray(np.r_[np.full(3, -1), np.arange(300), np.full(5, -1)][None], jnp.int32)
    mel = jnp.asarray(rng.uniform(-1, 1, (1, 128, 3000)), jnp.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits, _ = nnx.merge(graphdef, p, rest)(ids, mel, slots)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 1])

    jaxpr = str(jax.make_jaxpr(loss)(params))
    return jax.jit(jax.value_and_grad(loss))(params), jaxpr


@pytest.fixture(scope="module")
def baseline():
    return loss_and_grads("none")


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "dots_except_mlp", "offload"])
def test_remat_policies_match_no_remat(baseline, policy):
    (l0, g0), jaxpr0 = baseline
    (l1, g1), jaxpr1 = loss_and_grads(policy)
    assert "remat" in jaxpr1 and "remat" not in jaxpr0  # the policy is really applied
    assert abs(float(l1) - float(l0)) <= 1e-6 * abs(float(l0))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_frozen_positional_table_is_not_a_param():
    model = MuFun(preset("mufun-tiny"), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    assert "embed_positions" not in params["encoder"]
    assert "embed_positions" in nnx.state(model)["encoder"]


def test_dots_policies_save_the_blocked_attention_residuals(monkeypatch):
    """Under ``dots_no_batch`` the blocked attention's output and log-sum-exp are saved, so the
    backward pass of the encoder recomputes no attention forward: one ``exp`` (the softmax's)
    fewer than with the plain JAX policy. The gradients are those of no remat (test above)."""
    from mufun_jax.models import scan

    def backward_exps(policy):
        monkeypatch.setitem(scan.REMAT_POLICIES, "dots_no_batch", policy)
        model = MuFun(preset("mufun-tiny"), RunSettings(remat_policy="dots_no_batch", attention_impl="blocked"),
                      rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model.encoder)
        mel = jnp.zeros((1, 128, 3000), jnp.float32)
        f = lambda s: sum(jnp.sum(y) for y in nnx.merge(graphdef, s)(mel))
        return str(jax.make_jaxpr(jax.linearize(f, state)[1])(state)).count("= exp ")

    kept = backward_exps(scan.REMAT_POLICIES["dots_no_batch"])
    plain = backward_exps(jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    assert kept == plain - 1
