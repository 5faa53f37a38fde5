"""How a process runs the model, as opposed to what the model is (:mod:`mufun_jax.config`):
compute and parameter dtypes, the remat policy, the attention backend, LoRA adapters and
weight-only quantisation. Never saved with the weights, so a model trained with the TPU kernel
loads on a CPU with the CPU backend. Kept apart from the architecture configs so that the model
code, the trainer and the loaders share one definition of these choices (and of ``MODULES``).
"""

from __future__ import annotations

import dataclasses

# Implemented in models/scan.py. "full" saves nothing; "dots_except_mlp" saves the attention
# projections only; "offload" saves nothing on the device but each layer's input in host memory.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "dots_except_mlp", "offload")
# Attention backends of models/attention.py for the no-KV-cache path. "auto" picks by the platform
# compiled for: splash on TPU, cudnn on GPU for 16-bit compute, blocked otherwise. "splash_interpret" is
# the TPU splash kernel in Pallas interpret mode, for CPU tests only.
ATTENTION_IMPLS = ("auto", "xla", "blocked", "splash", "pallas_tpu", "cudnn", "splash_interpret")
DTYPES = ("float32", "bfloat16", "float16")
RUN_KEYS = ("dtype", "param_dtype", "remat_policy", "attention_impl")  # RunSettings' fields

LORA_ALL_LINEAR = "all-linear"
# Linear layers of each module (lm_head excepted: PEFT's all-linear leaves the output layer out too)
LORA_LINEAR_NAMES = {
    "whisper": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "connector": ("linear1", "linear2"),
    "llm": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
MODULES = ("whisper", "connector", "llm")
QUANT_MODES = ("int8", "nf4")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Defaults follow the reference's LoRA training scripts (``lora_r 128``, ``lora_alpha 256``)
    and its recipe's dropout (0.05); targets: every linear layer of the module (for Qwen3 the
    seven projections the reference adapts)."""

    rank: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    targets: tuple[str, ...] = (LORA_ALL_LINEAR,)

    def __post_init__(self):
        object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"lora.rank={self.rank!r} must be a positive integer")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha!r} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout!r} must be in [0, 1)")
        known = {n for names in LORA_LINEAR_NAMES.values() for n in names} | {LORA_ALL_LINEAR}
        bad = [t for t in self.targets if t not in known]
        if bad or not self.targets:
            raise ValueError(f"lora.targets={list(self.targets)}: unknown {bad or 'empty list'}; known: "
                             f"{LORA_ALL_LINEAR!r} or the layer names {dict(LORA_LINEAR_NAMES)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def names(self, module: str) -> tuple[str, ...]:
        """The target layer names of one module (``all-linear`` expanded)."""
        own = LORA_LINEAR_NAMES[module]
        return own if LORA_ALL_LINEAR in self.targets else tuple(t for t in own if t in self.targets)


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How a process runs the model: compute and parameter dtypes, the remat policy and the
    attention backend. Not architecture, so never saved with the weights."""

    dtype: str = "float32"  # compute dtype of the matmuls; bfloat16 on accelerators
    param_dtype: str = "float32"  # storage dtype of the parameters
    remat_policy: str = "none"  # none | full | dots | dots_no_batch | dots_except_mlp | offload
    attention_impl: str = "auto"  # auto | xla | splash | cudnn | splash_interpret (no-cache path only)
    lora: LoraConfig | None = None  # adapters on the linear layers of ``lora_modules``
    lora_modules: tuple[str, ...] = ()
    quantize: str | None = None  # int8 | nf4: weight-only quantisation of ``quantize_modules``' weights
    quantize_modules: tuple[str, ...] = MODULES

    def __post_init__(self):
        object.__setattr__(self, "lora_modules", tuple(self.lora_modules))
        object.__setattr__(self, "quantize_modules", tuple(self.quantize_modules))
        bad = [m for m in self.lora_modules + self.quantize_modules if m not in MODULES]
        if bad:
            raise ValueError(f"unknown module(s) {bad}: the modules are {list(MODULES)}")
        if self.lora_modules and self.lora is None:
            object.__setattr__(self, "lora", LoraConfig())
        if self.quantize in ("none", ""):
            object.__setattr__(self, "quantize", None)
        if self.quantize is not None and self.quantize not in QUANT_MODES:
            raise ValueError(f"quantize={self.quantize!r} is not one of {list(QUANT_MODES)} (or none)")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {DTYPES}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r} is not one of {list(REMAT_POLICIES)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r} is not one of {list(ATTENTION_IMPLS)}")

    def replace(self, **kw) -> "RunSettings":
        return dataclasses.replace(self, **kw)
