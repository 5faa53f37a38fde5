"""JAX/Flax NNX reimplementation of MuFun (Whisper-large-v3 -> blp_4i_2x -> Qwen3-8B-Base)."""

from mufun_jax.config import ConnectorConfig, MuFunConfig, Qwen3Config, WhisperConfig, preset

__version__ = "0.1.0"

__all__ = ["ConnectorConfig", "MuFunConfig", "Qwen3Config", "WhisperConfig", "preset", "__version__"]
