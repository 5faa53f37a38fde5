"""Layers stored stacked on a leading ``layers`` axis and run with ``lax.scan``.

Stacking keeps compile time independent of depth (one traced layer, not 36) and gives
the converter one array per parameter kind. Remat policies wrap the scanned body.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mufun_jax import run_settings
from mufun_jax.models import lora

# Names tagged with ``jax.ad_checkpoint.checkpoint_name`` in the models, for the named policies.
ATTENTION_PROJ_NAMES = ("query_proj", "key_proj", "value_proj", "out_proj")
LAYER_INPUT = "layer_input"  # every scanned layer's input (the scan carry)
# The blocked attention's output and row log-sum-exp (its custom VJP's residuals). Saving them
# costs one activation per layer and spares the backward pass a second attention forward: on
# CPU that forward was 13% of Whisper's forward + backward under ``dots_no_batch``.
ATTENTION_RESIDUAL_NAMES = ("attention_out", "attention_lse")
_keep_attention = jax.checkpoint_policies.save_only_these_names(*ATTENTION_RESIDUAL_NAMES)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass
    # keep matmul outputs (and the attention's residuals)
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.checkpoint_dots, _keep_attention),
    # keep weight matmuls only (and the attention's residuals)
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _keep_attention),
    # keep the q/k/v/o projections, recompute the MLP (its (tokens x 12288) activations dominate)
    "dots_except_mlp": jax.checkpoint_policies.save_only_these_names(*ATTENTION_PROJ_NAMES, *ATTENTION_RESIDUAL_NAMES),
    # save nothing in device memory: each layer's input goes to pinned host memory in the forward
    # pass and comes back for the backward pass (TPU/GPU; needs host offload support)
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT], offload_src="device",
        offload_dst="pinned_host"),
}
assert set(REMAT_POLICIES) == set(run_settings.REMAT_POLICIES)


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """Build ``num_layers`` independently initialised copies of a layer as one module whose
    variables have a leading axis, with ``'layers'`` prepended to their logical axes."""
    keys = jax.random.split(rngs.params(), num_layers)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make_layer(nnx.Rngs(0))))
    state = jax.vmap(lambda k: nnx.state(make_layer(nnx.Rngs(params=k))))(keys)
    stacked = nnx.merge(graphdef, state)
    for _, var in nnx.iter_graph(stacked):
        if isinstance(var, nnx.Variable) and var.has_metadata("logical_axes"):
            var.set_metadata("logical_axes", ("layers",) + tuple(var.get_metadata("logical_axes")))
    return stacked


def scan_layers(layers: nnx.Module, body: Callable, carry, xs=None, *, stop: int | None = None,
                remat_policy: str = "none", collect: Sequence[int] = ()):
    """Run ``body(layer, carry, x) -> (carry, y)`` over layers ``[0, stop)`` with one ``lax.scan``.

    ``xs`` (optional) is scanned alongside the layer weights (e.g. a per-layer KV cache). The remat
    policy wraps ``body``. ``collect`` lists layer counts ``k`` (1 <= k <= stop) whose output carry
    (after layer ``k - 1``) is kept: then the result is ``(carry, ys, collected)`` with ``collected``
    stacked on a leading axis in ``collect`` order. The collection is a ``dynamic_update_slice``
    outside the remat, so it adds no residuals: every layer keeps its remat, whatever the taps.
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
    graphdef, state = nnx.split(layers)
    n = jax.tree.leaves(state)[0].shape[0]
    stop = n if stop is None else stop
    if stop != n:
        state = jax.tree.map(lambda a: a[:stop], state)
        if xs is not None:
            xs = jax.tree.map(lambda a: a[:stop], xs)

    key = lora.current_key()
    if key is not None:  # LoRA dropout: every layer draws its own masks
        xs = (xs, jax.random.split(jax.random.fold_in(key, stop), stop))

    def layer_fn(layer_state, c, x):
        c = jax.tree.map(lambda a: checkpoint_name(a, LAYER_INPUT), c)  # a no-op unless a policy names it
        if key is None:
            return body(nnx.merge(graphdef, layer_state), c, x)
        with lora.dropout_key(x[1]):
            return body(nnx.merge(graphdef, layer_state), c, x[0])

    policy = REMAT_POLICIES[remat_policy]
    if policy is not None:
        layer_fn = jax.checkpoint(layer_fn, policy=policy, prevent_cse=False)
    collect = tuple(collect)
    if not collect:
        return jax.lax.scan(lambda c, inp: layer_fn(inp[0], c, inp[1]), carry, (state, xs))
    if any(not 1 <= k <= stop for k in collect):
        raise ValueError(f"collect={list(collect)} must lie in [1, {stop}]")
    # slot of each layer's output in the buffer; layers that are not collected write a spare slot
    slots = np.full(stop, len(collect), np.int32)
    for j, k in enumerate(collect):
        slots[k - 1] = j
    buf = jnp.zeros((len(collect) + 1,) + carry.shape, carry.dtype)

    def step(c, inp):
        (h, buf), (layer_state, x, slot) = c, inp
        h, y = layer_fn(layer_state, h, x)
        return (h, jax.lax.dynamic_update_index_in_dim(buf, h, slot, 0)), y

    (carry, buf), ys = jax.lax.scan(step, (carry, buf), (state, xs, jnp.asarray(slots)))
    return carry, ys, buf[:-1]
