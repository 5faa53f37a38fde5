"""The connector that maps pooled audio features into the LLM's embedding space.

``blp_{i}i_{h}x`` (MuFun's ``blp_4i_2x``): Linear(in, h*in) -> exact GELU -> Linear(h*in, llm_hidden),
biases on both, where ``in`` is d_model x number of taps (4 x 1280 = 5120).
``mlp2x_gelu`` and ``linear`` are TinyLLaVA's other two projector kinds.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mufun_jax.config import ConnectorConfig, parse_connector_type
from mufun_jax.models.layers import Linear, gelu


class Connector(nnx.Module):
    def __init__(self, cfg: ConnectorConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.kind, _ = parse_connector_type(cfg.connector_type)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if self.kind == "linear":
            self.linear1 = Linear(cfg.in_dim, cfg.out_dim, axes=("audio_embed", "embed"), **kw)
            self.linear2 = None
        else:
            hidden = cfg.hidden_dim
            self.linear1 = Linear(cfg.in_dim, hidden, axes=("audio_embed", "mlp"), **kw)
            self.linear2 = Linear(hidden, cfg.out_dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        x = self.linear1(x)
        if self.linear2 is not None:
            x = self.linear2(gelu(x))
        return x
