"""JAX/Flax NNX reimplementation of MuFun (Whisper-large-v3 -> blp_4i_2x -> Qwen3-8B-Base)."""

from mufun_jax.config import ConnectorConfig, MuFunConfig, Qwen3Config, WhisperConfig, preset
from mufun_jax.run_settings import RunSettings

__version__ = "0.1.0"

__all__ = ["ConnectorConfig", "MuFun", "MuFunConfig", "Qwen3Config", "RunSettings", "WhisperConfig", "preset",
           "__version__"]


def __getattr__(name):
    # The inference API (mufun_jax.api.MuFun) pulls in jax and flax: imported on first use only, so
    # that `import mufun_jax` stays cheap. The nnx module of the same name is mufun_jax.models.MuFun.
    if name == "MuFun":
        from mufun_jax.api import MuFun

        return MuFun
    raise AttributeError(f"module 'mufun_jax' has no attribute {name!r}")
