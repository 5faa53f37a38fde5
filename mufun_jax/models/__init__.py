"""Flax NNX modules: one file per component."""

from mufun_jax.models.connector import Connector
from mufun_jax.models.mufun import MuFun
from mufun_jax.models.qwen3 import KVCache, Qwen3ForCausalLM
from mufun_jax.models.whisper import WhisperEncoder

__all__ = ["Connector", "KVCache", "MuFun", "Qwen3ForCausalLM", "WhisperEncoder"]
