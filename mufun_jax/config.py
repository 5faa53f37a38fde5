"""Configuration dataclasses for MuFun and its three parts.

Each config can be built from what users already have: an HF ``config.json`` dict
(Whisper, Qwen3), the combined TinyLLaVA-style MuFun ``config.json``, a YAML file, or a named
preset plus overrides (:func:`resolve_model`, the one place that merges overrides).

Two kinds of settings, kept apart on purpose:
- :class:`MuFunConfig` is the architecture: what function the model computes. It is saved with
  the weights.
- :class:`~mufun_jax.run_settings.RunSettings` is how this process runs it (compute and parameter
  dtype, remat policy, attention backend, LoRA, quantisation). It comes from the training config,
  CLI flags or ``from_pretrained`` arguments and is never saved with the weights, so a model
  trained with the TPU kernel loads on a CPU with the CPU backend. It lives in
  :mod:`mufun_jax.run_settings` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

# re-exported: the run settings' home is run_settings; many callers import them from here with the model configs
from mufun_jax.run_settings import RUN_KEYS, LoraConfig, RunSettings  # noqa: F401

log = logging.getLogger(__name__)

IMAGE_TOKEN_INDEX = -200  # `<audio>` placeholder id in the reference (inherited from TinyLLaVA)
IGNORE_INDEX = -100
ENDOFTEXT_ID = 151643  # `<|endoftext|>`: pad, and eos of base models
IM_END_ID = 151645  # `<|im_end|>`: end token of the instruct template



def _check_known(cls, d: Mapping[str, Any], where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid keys are {sorted(names)}")


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    """Whisper audio encoder (the encoder half of an HF ``WhisperConfig``)."""

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500
    layer_norm_eps: float = 1e-5  # torch nn.LayerNorm default; HF Whisper does not store it

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def num_frames(self) -> int:
        """Mel frames the encoder accepts: conv2 has stride 2, so 2 x positions (3000)."""
        return 2 * self.max_source_positions

    def __post_init__(self):
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(
                f"Whisper d_model={self.d_model} is not divisible by "
                f"encoder_attention_heads={self.encoder_attention_heads}"
            )

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "WhisperConfig":
        """From an HF Whisper ``config.json`` dict (decoder fields are ignored: we only run the encoder)."""
        act = d.get("activation_function", "gelu")
        if act != "gelu":
            raise ValueError(f"Whisper activation_function={act!r} is not supported; MuFun uses 'gelu' (exact erf)")
        if d.get("scale_embedding", False):
            raise ValueError("Whisper scale_embedding=True is not supported (whisper-large-v3 has False)")
        return cls(
            num_mel_bins=int(d.get("num_mel_bins", 80)),
            d_model=int(d["d_model"]),
            encoder_layers=int(d["encoder_layers"]),
            encoder_attention_heads=int(d["encoder_attention_heads"]),
            encoder_ffn_dim=int(d["encoder_ffn_dim"]),
            max_source_positions=int(d.get("max_source_positions", 1500)),
        )

    def to_hf(self) -> dict:
        """The encoder fields of an HF ``WhisperConfig`` dict (enough for ``WhisperConfig(**d)``)."""
        return {
            "model_type": "whisper",
            "num_mel_bins": self.num_mel_bins,
            "d_model": self.d_model,
            "encoder_layers": self.encoder_layers,
            "encoder_attention_heads": self.encoder_attention_heads,
            "encoder_ffn_dim": self.encoder_ffn_dim,
            "max_source_positions": self.max_source_positions,
            "activation_function": "gelu",
            "scale_embedding": False,
        }


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Qwen3 decoder-only LM (fields and names as in HF ``Qwen3Config``)."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Qwen3 num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)"
            )

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "Qwen3Config":
        """From an HF Qwen3 ``config.json`` dict (transformers 4.x ``rope_theta`` or 5.x ``rope_parameters``)."""
        if d.get("model_type", "qwen3") != "qwen3":
            raise ValueError(f"expected a Qwen3 config, got model_type={d.get('model_type')!r}")
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            raise ValueError(f"Qwen3 rope_type={rope_type!r} is not supported; only 'default' RoPE is implemented")
        theta = rope.get("rope_theta", d.get("rope_theta", 1_000_000.0))
        if d.get("attention_bias", False):
            raise ValueError("Qwen3 attention_bias=True is not supported (Qwen3 checkpoints have no attention biases)")
        if d.get("use_sliding_window", False):
            raise ValueError("Qwen3 use_sliding_window=True is not supported (Qwen3-8B-Base does not use it)")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Qwen3 hidden_act={d.get('hidden_act')!r} is not supported; expected 'silu'")
        heads = int(d["num_attention_heads"])
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            rope_theta=float(theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 40960)),
        )

    def to_hf(self) -> dict:
        """An HF Qwen3 ``config.json`` dict that ``Qwen3Config(**d)`` accepts."""
        return {
            "model_type": "qwen3",
            "architectures": ["Qwen3ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "use_sliding_window": False,
        }


_BLP_RE = re.compile(r"^blp_(\d+)i_(\d+)x$")


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
    """Audio-feature -> LLM-embedding projector.

    ``in_dim`` is the width of the pooled audio features (d_model x number of taps);
    ``out_dim`` always follows the LLM hidden size (4096 for Qwen3-8B, never 3584).
    """

    connector_type: str = "blp_4i_2x"
    in_dim: int = 5120
    out_dim: int = 4096

    @property
    def hidden_dim(self) -> int | None:
        """Width of the first projection, or None for the single-matrix ``linear`` type."""
        kind, mult = parse_connector_type(self.connector_type)
        if kind == "linear":
            return None
        if kind == "mlp":
            return self.out_dim
        return mult * self.in_dim

    def __post_init__(self):
        parse_connector_type(self.connector_type)


def parse_connector_type(connector_type: str) -> tuple[str, int]:
    """Parse a TinyLLaVA/MuFun connector name into (kind, hidden multiplier).

    ``blp_{i}i_{h}x``: Linear(in, h*in) -> GELU -> Linear(h*in, out), where in = vision_hidden*i.
    ``mlp2x_gelu``: Linear(in, out) -> GELU -> Linear(out, out).
    ``linear``: Linear(in, out).
    """
    if not isinstance(connector_type, str):
        raise ValueError(f"connector_type must be a string, got {connector_type!r}")
    if connector_type == "linear":
        return "linear", 1
    if connector_type == "mlp2x_gelu":
        return "mlp", 1
    m = _BLP_RE.match(connector_type)
    if m and int(m.group(1)) > 0 and int(m.group(2)) > 0:
        return "blp", int(m.group(2))
    raise ValueError(
        f"unknown or unparsable connector_type {connector_type!r}; "
        "expected 'blp_{i}i_{h}x' (e.g. 'blp_4i_2x'), 'mlp2x_gelu' or 'linear'"
    )


def blp_num_inputs(connector_type: str) -> int | None:
    """The ``i`` of ``blp_{i}i_{h}x``: how many vision hidden widths linear1 expects."""
    m = _BLP_RE.match(connector_type)
    return int(m.group(1)) if m else None


@dataclasses.dataclass(frozen=True)
class MuFunConfig:
    """The whole model: Whisper encoder -> taps -> AvgPool -> connector -> Qwen3.

    ``taps`` and ``pool_stride`` are fixed in the reference code (not in its config.json);
    they are configurable here for small test models.
    """

    whisper: WhisperConfig = dataclasses.field(default_factory=WhisperConfig)
    qwen3: Qwen3Config = dataclasses.field(default_factory=Qwen3Config)
    connector_type: str = "blp_4i_2x"
    taps: tuple[int, ...] = (0, 7, 15, 32)
    pool_stride: int = 5
    image_token_index: int = IMAGE_TOKEN_INDEX
    ignore_index: int = IGNORE_INDEX
    pad_token_id: int = ENDOFTEXT_ID
    pad_token: str = "<|endoftext|>"
    tokenizer_model_max_length: int = 4096
    tokenizer_padding_side: str = "right"
    tokenizer_use_fast: bool = False

    def __post_init__(self):
        object.__setattr__(self, "taps", tuple(int(t) for t in self.taps))
        L = self.whisper.encoder_layers
        if not self.taps or list(self.taps) != sorted(set(self.taps)) or self.taps[0] < 0 or self.taps[-1] > L:
            raise ValueError(
                f"taps={list(self.taps)} must be strictly increasing indices in [0, {L}] "
                "(HF hidden_states numbering: 0 = conv+positions, k = after block k, "
                f"{L} = after the final LayerNorm)"
            )
        if self.pool_stride < 1 or self.whisper.max_source_positions % self.pool_stride:
            raise ValueError(
                f"pool_stride={self.pool_stride} must divide max_source_positions="
                f"{self.whisper.max_source_positions}"
            )
        parse_connector_type(self.connector_type)
        i = blp_num_inputs(self.connector_type)
        if i is not None and i != len(self.taps):
            raise ValueError(
                f"connector_type={self.connector_type!r} expects {i} stacked encoder widths, "
                f"but taps={list(self.taps)} gives {len(self.taps)}"
            )
        if self.tokenizer_padding_side not in ("right", "left"):
            raise ValueError(f"tokenizer_padding_side={self.tokenizer_padding_side!r} must be 'right' or 'left'")

    # -- derived sizes ---------------------------------------------------------------
    @property
    def audio_feature_dim(self) -> int:
        return self.whisper.d_model * len(self.taps)

    @property
    def tokens_per_chunk(self) -> int:
        """Audio embeddings per 30 s chunk (300 for the real model)."""
        return self.whisper.max_source_positions // self.pool_stride

    @property
    def connector(self) -> ConnectorConfig:
        return ConnectorConfig(self.connector_type, self.audio_feature_dim, self.qwen3.hidden_size)

    def replace(self, **kw) -> "MuFunConfig":
        return dataclasses.replace(self, **kw)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MuFunConfig":
        """From our own nested dict form (what ``to_dict`` and ``mufun_config.json`` hold). Run
        settings that older directories saved with the architecture are ignored, with one info line."""
        d = dict(d)
        legacy = {k: d.pop(k) for k in RUN_KEYS if k in d}
        if legacy:
            log.info("ignoring run settings saved with the model config %s: they are chosen at load time "
                     "(from_pretrained / infer.py flags / the training config)", legacy)
        _check_known(cls, d, "MuFun config")
        w = d.pop("whisper", {}) or {}
        q = d.pop("qwen3", {}) or {}
        _check_known(WhisperConfig, w, "MuFun config 'whisper'")
        _check_known(Qwen3Config, q, "MuFun config 'qwen3'")
        if "taps" in d:
            d["taps"] = tuple(d["taps"])
        return cls(whisper=WhisperConfig(**w), qwen3=Qwen3Config(**q), **d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["taps"] = list(self.taps)
        return d

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MuFunConfig":
        """From a YAML file: either the nested dict form, or ``{preset: NAME, ...overrides}``."""
        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(d).__name__}")
        d = dict(d.get("model", d))
        if "preset" in d:
            return resolve_model(d.pop("preset"), d)
        return cls.from_dict(d)

    @classmethod
    def from_hf_parts(cls, whisper: Mapping[str, Any], qwen3: Mapping[str, Any], **kw) -> "MuFunConfig":
        """From separate HF Whisper and Qwen3 ``config.json`` dicts (training from scratch)."""
        return cls(whisper=WhisperConfig.from_hf(whisper), qwen3=Qwen3Config.from_hf(qwen3), **kw)

    @classmethod
    def from_tinyllava(cls, d: Mapping[str, Any], **kw) -> "MuFunConfig":
        """From the combined MuFun ``config.json`` (``model_type: tinyllava``)."""
        for key in ("text_config", "vision_config", "connector_type"):
            if key not in d:
                raise ValueError(f"MuFun config.json lacks {key!r}; is this a TinyLLaVA/MuFun checkpoint config?")
        whisper = WhisperConfig.from_hf(d["vision_config"])
        qwen3 = Qwen3Config.from_hf(d["text_config"])
        if "hidden_size" in d and int(d["hidden_size"]) != qwen3.hidden_size:
            raise ValueError(
                f"config.json hidden_size={d['hidden_size']} disagrees with text_config.hidden_size="
                f"{qwen3.hidden_size}; the connector output must follow the LLM (4096 for Qwen3-8B)"
            )
        if "vision_hidden_size" in d and int(d["vision_hidden_size"]) != whisper.d_model:
            raise ValueError(
                f"config.json vision_hidden_size={d['vision_hidden_size']} disagrees with "
                f"vision_config.d_model={whisper.d_model}"
            )
        fields = {}
        for key in (
            "image_token_index", "ignore_index", "pad_token_id", "pad_token", "tokenizer_model_max_length",
            "tokenizer_padding_side", "tokenizer_use_fast",
        ):
            if d.get(key) is not None:
                fields[key] = d[key]
        # Not in the reference config (fixed in its code); our exports record them for small models.
        if d.get("audio_taps") is not None:
            fields["taps"] = tuple(d["audio_taps"])
        if d.get("audio_pool_stride") is not None:
            fields["pool_stride"] = int(d["audio_pool_stride"])
        fields.update(kw)
        return cls(whisper=whisper, qwen3=qwen3, connector_type=d["connector_type"], **fields)

    def to_tinyllava(self) -> dict:
        """The combined MuFun ``config.json`` dict, for export back to the reference layout."""
        return {
            "model_type": "tinyllava",
            "architectures": ["TinyLlavaForConditionalGeneration"],
            "connector_type": self.connector_type,
            "text_config": self.qwen3.to_hf(),
            "vision_config": self.whisper.to_hf(),
            "hidden_size": self.qwen3.hidden_size,
            "vocab_size": self.qwen3.vocab_size,
            "vision_hidden_size": self.whisper.d_model,
            "ignore_index": self.ignore_index,
            "image_token_index": self.image_token_index,
            "pad_token": self.pad_token,
            "pad_token_id": self.pad_token_id,
            "tokenizer_padding_side": self.tokenizer_padding_side,
            "tokenizer_model_max_length": self.tokenizer_model_max_length,
            "tokenizer_use_fast": self.tokenizer_use_fast,
            "audio_taps": list(self.taps),  # extra keys: TinyLlavaConfig keeps unknown kwargs as attributes
            "audio_pool_stride": self.pool_stride,
        }


PRESETS: dict[str, MuFunConfig] = {
    # Whisper-large-v3 + blp_4i_2x + Qwen3-8B-Base, as released.
    "mufun-8b": MuFunConfig(),
    # A few-MB model with every structural feature of the real one (GQA, 4 taps with the
    # final-LayerNorm tap, 300 tokens per chunk, 3000-frame input), for tests and demos.
    "mufun-tiny": MuFunConfig(
        whisper=WhisperConfig(
            num_mel_bins=128, d_model=64, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=128,
        ),
        qwen3=Qwen3Config(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rope_theta=1_000_000.0, tie_word_embeddings=False,
            max_position_embeddings=4096,
        ),
        taps=(0, 2, 3, 4),
        pad_token_id=0,
        pad_token="<pad>",
        tokenizer_model_max_length=2048,
    ),
}


def preset(name: str) -> MuFunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]


def resolve_model(base: MuFunConfig | str, overrides: Mapping[str, Any] | None = None) -> MuFunConfig:
    """``base`` (a config or a preset name) with ``overrides`` in the nested dict form
    (``{"qwen3": {"num_hidden_layers": 2}, "taps": [0, 1]}``). The one place that merges model
    overrides: the YAML loader, the training config and the AOT drivers all call it."""
    cfg = preset(base) if isinstance(base, str) else base
    overrides = dict(overrides or {})
    run = sorted(k for k in overrides if k in RUN_KEYS)
    if run:
        raise ValueError(f"model overrides {run} are run settings, not architecture: set them at the top level of "
                         f"the training config (e.g. dtype: bfloat16), or as from_pretrained / CLI arguments")
    if "preset" in overrides:
        raise ValueError("a 'preset' inside model overrides is ambiguous here; give one base model")
    merged = cfg.to_dict()
    for k in ("whisper", "qwen3"):
        sub = overrides.pop(k, None) or {}
        if not isinstance(sub, Mapping):
            raise ValueError(f"model override {k!r} must be a mapping, got {sub!r}")
        merged[k] = {**merged[k], **sub}
    merged.update(overrides)
    return MuFunConfig.from_dict(merged)
