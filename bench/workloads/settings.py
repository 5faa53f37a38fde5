"""What both sides of bench/compare.py share: the settings (model shape, data ranges, workload
sizes), the progress log, the facts recorded about each runtime and machine, and the reference
model (the composed torch MuFun) that every torch-side workload builds.

Every module of this package is imported by bench/compare.py (run as ``python bench/compare.py``,
so bench/ is first on the import path) and by its child processes. ``mufun_jax`` must be
importable: installed (``make install``) or on ``PYTHONPATH`` (the Makefile's ``bench`` target puts
the checkout there); nothing here edits ``sys.path``."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import resource
import sys
import time

T_START = time.perf_counter()
PROMPTS = ["What genre is this?", "Describe the rhythm.", "Which instruments play?", "Is the tempo fast or slow?"]


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:6.1f} s] {msg}", file=sys.stderr, flush=True)


# -- settings ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    whisper: dict
    taps: list
    connector_type: str
    qwen3: dict
    clip_s: tuple  # clip length range, seconds
    prompt_tokens: tuple  # prompt length range (tokens, the <audio> placeholder excluded)
    answer_tokens: tuple  # answer length range (label tokens; inference: per-request caps)
    train_samples: int  # samples in the timed window of each training row
    warm_samples: int  # samples of the warm-up (compile) window, a different draw
    ref_batch: int  # reference: samples per padded batch
    ref_accum: int  # reference: batches per optimizer step
    pack_grid: list  # candidate (rows, seq_len, max_chunks) for our packing
    n_requests: int
    engine_batch: int
    pipeline_chunks: int
    remat: str = "none"
    seed: int = 0
    device: str = "cpu"
    # fp32: both sides in fp32. bf16: ours computes in bf16 (fp32 master weights in training, bf16
    # weights in inference), the reference under bf16 autocast (training) or as bf16 modules
    # (inference, components): each side the way its users run bf16
    precision: str = "fp32"
    # the tagging workload (bench/tagging.py): songs, song length range (s), short and long answer caps
    tag_songs: int = 24
    tag_song_s: tuple = (10.0, 240.0)
    tag_short: tuple = (5, 30)
    tag_long: tuple = (100, 400)

    def model_dict(self) -> dict:
        return {"whisper": self.whisper, "qwen3": self.qwen3, "taps": list(self.taps),
                "connector_type": self.connector_type, "pad_token_id": 0, "pad_token": "<|endoftext|>",
                "tokenizer_model_max_length": 4096}

    def run_dict(self) -> dict:
        """Our run settings: remat, and the compute dtype of ``precision`` (parameters stay fp32)."""
        return {"remat_policy": self.remat, "dtype": "bfloat16" if self.precision == "bf16" else "float32"}

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        tuples = ("clip_s", "prompt_tokens", "answer_tokens", "tag_song_s", "tag_short", "tag_long")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})


def full_settings() -> Settings:
    return Settings(
        whisper=dict(num_mel_bins=128, d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536),
        taps=[0, 2, 3, 4], connector_type="blp_4i_2x",
        qwen3=dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=64, rope_theta=1_000_000.0,
                   tie_word_embeddings=False, max_position_embeddings=4096),
        clip_s=(5.0, 120.0), prompt_tokens=(40, 80), answer_tokens=(5, 200),
        train_samples=16, warm_samples=4, ref_batch=4, ref_accum=2,
        # max_chunks <= 8 keeps our step under ~10 GB RSS on a 2-core / 23 GB host (see the remat note above)
        pack_grid=[(r, t, c) for t in (1536, 2048, 3072) for r in (1, 2, 3, 4) for c in (6, 8)
                   if 3000 <= r * t <= 6144],
        remat="dots_no_batch",
        n_requests=16, engine_batch=8, pipeline_chunks=8)


def tiny_settings() -> Settings:
    """A smoke-test size: every code path of the full run, a few seconds of compute."""
    return Settings(
        whisper=dict(num_mel_bins=128, d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64),
        taps=[0, 1], connector_type="blp_2i_2x",
        qwen3=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, rope_theta=1_000_000.0, tie_word_embeddings=False,
                   max_position_embeddings=4096),
        clip_s=(2.0, 40.0), prompt_tokens=(8, 16), answer_tokens=(2, 6),
        train_samples=4, warm_samples=2, ref_batch=2, ref_accum=1, pack_grid=[(2, 768, 4)],
        n_requests=3, engine_batch=4, pipeline_chunks=1,
        tag_songs=2, tag_song_s=(10.0, 40.0), tag_short=(2, 4), tag_long=(6, 10))


def model_config(s: Settings):
    from mufun_jax.config import MuFunConfig

    return MuFunConfig.from_dict(s.model_dict())


def run_settings(s: Settings):
    from mufun_jax.config import RunSettings

    return RunSettings(**s.run_dict())


# -- facts ------------------------------------------------------------------------------------------


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def jax_facts() -> dict:
    import jax

    return {"jax": jax.__version__, "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind,
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}


def torch_facts() -> dict:
    import re

    import torch

    cfg = torch.__config__.show()
    blas = ", ".join(m.group(0) for m in re.finditer(r"(BLAS_INFO|LAPACK_INFO|USE_MKLDNN|USE_OPENMP)=[^,\s]+", cfg))
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "torch_blas": blas,
            "torch_parallel_info": torch.__config__.parallel_info().strip().splitlines(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def device_mem_jax() -> dict:
    import jax

    try:
        st = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - the CPU backend may not report
        st = {}
    return {"peak_device_mem_mb": st["peak_bytes_in_use"] / 2**20} if "peak_bytes_in_use" in st else {}


def machine_facts() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    model = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_start": list(os.getloadavg())}


# -- the reference model ---------------------------------------------------------------------------


def build_reference(cfg, seed: int = 3, device: str = "cpu"):
    """``mufun_jax.testing.torch_reference.TorchMuFun`` with sdpa attention (the fastest HF attention on CPU)."""
    import torch

    from mufun_jax.testing.torch_reference import TorchMuFun

    ref = TorchMuFun(cfg, seed=seed)
    for m in (ref.vision_tower._vision_tower, ref.language_model):
        m.set_attn_implementation("sdpa")
    return ref.to("cuda" if device == "gpu" else "cpu").to(torch.float32)


def autocast(s: Settings):
    """bf16 autocast at ``precision`` bf16 (what HF Trainer's bf16=True does, on CPU or GPU); nothing at fp32."""
    import torch

    if s.precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if s.device == "gpu" else "cpu", dtype=torch.bfloat16)


def torch_dtype(s: Settings):
    """The reference's module dtype for inference and the component profile: bf16 modules at bf16."""
    import torch

    return torch.bfloat16 if s.precision == "bf16" else torch.float32

