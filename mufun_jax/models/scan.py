"""Layers stored stacked on a leading ``layers`` axis and run with ``lax.scan``.

Stacking keeps compile time independent of depth (one traced layer, not 36) and gives
the converter one array per parameter kind. Remat policies wrap the scanned body.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mufun_jax import config

# Names tagged with ``jax.ad_checkpoint.checkpoint_name`` in the models, for the named policies.
ATTENTION_PROJ_NAMES = ("query_proj", "key_proj", "value_proj", "out_proj")
LAYER_INPUT = "layer_input"  # every scanned layer's input (the scan carry)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
    # keep the q/k/v/o projections, recompute the MLP (its (tokens x 12288) activations dominate)
    "dots_except_mlp": jax.checkpoint_policies.save_only_these_names(*ATTENTION_PROJ_NAMES),
    # save nothing in device memory: each layer's input goes to pinned host memory in the forward
    # pass and comes back for the backward pass (TPU/GPU; needs host offload support)
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT], offload_src="device",
        offload_dst="pinned_host"),
}
assert set(REMAT_POLICIES) == set(config.REMAT_POLICIES)


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


def scan_layers(layers: nnx.Module, body: Callable, carry, xs=None, *, start: int = 0, stop: int | None = None,
                remat_policy: str = "none"):
    """Run ``body(layer, carry, x) -> (carry, y)`` over layers ``[start, stop)`` with ``lax.scan``.

    ``xs`` (optional) is scanned alongside the layer weights (e.g. a per-layer KV cache).
    """
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
    graphdef, state = nnx.split(layers)
    if start != 0 or stop is not None:
        state = jax.tree.map(lambda a: a[start:stop], state)
        if xs is not None:
            xs = jax.tree.map(lambda a: a[start:stop], xs)

    def step(c, inp):
        layer_state, x = inp
        c = jax.tree.map(lambda a: checkpoint_name(a, LAYER_INPUT), c)  # a no-op unless a policy names it
        return body(nnx.merge(graphdef, layer_state), c, x)

    policy = REMAT_POLICIES[remat_policy]
    if policy is not None:
        step = jax.checkpoint(step, policy=policy, prevent_cse=False)
    return jax.lax.scan(step, carry, (state, xs))
