"""Shared builders for tests: a JAX MuFun and the torch reference with identical weights."""

from __future__ import annotations

import numpy as np
from flax import nnx

from mufun_jax.config import MuFunConfig
from mufun_jax.convert import load_params, torch_to_flax
from mufun_jax.models import MuFun


def jax_mufun_from_torch(ref, cfg: MuFunConfig) -> MuFun:
    """A JAX MuFun whose weights come from the torch reference through the converter's mapping."""
    model = MuFun(cfg, rngs=nnx.Rngs(123))
    load_params(model, torch_to_flax(ref.combined_state_dict(), cfg))
    return model


def random_mel(rng: np.random.Generator, chunks: int, cfg: MuFunConfig) -> np.ndarray:
    """Log-mel-like values in Whisper's normalised range [-1.5, 1.5]."""
    return rng.uniform(-1.5, 1.5, (chunks, cfg.whisper.num_mel_bins, cfg.whisper.num_frames)).astype(np.float32)
