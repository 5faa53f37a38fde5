"""Shared builders for tests: a JAX MuFun and the torch reference with identical weights."""

from __future__ import annotations

import numpy as np
from flax import nnx

from mufun_jax.config import MuFunConfig
from mufun_jax.convert import load_params, torch_to_flax
from mufun_jax.models import MuFun


# mufun-tiny with a narrower, shallower Whisper: the training tests compile and run ~4x faster.
SMALL_WHISPER = dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64)
SMALL_MODEL = {"preset": "mufun-tiny", "whisper": SMALL_WHISPER, "taps": [0, 1, 2], "connector_type": "blp_3i_2x"}


def small_cfg() -> MuFunConfig:
    from mufun_jax.config import WhisperConfig, preset

    return preset("mufun-tiny").replace(whisper=WhisperConfig(num_mel_bins=128, **SMALL_WHISPER), taps=(0, 1, 2),
                                        connector_type="blp_3i_2x")


def jax_mufun_from_torch(ref, cfg: MuFunConfig, run=None) -> MuFun:
    """A JAX MuFun whose weights come from the torch reference through the converter's mapping."""
    model = MuFun(cfg, run, rngs=nnx.Rngs(123))
    load_params(model, torch_to_flax(ref.combined_state_dict(), cfg))
    return model


def random_mel(rng: np.random.Generator, chunks: int, cfg: MuFunConfig) -> np.ndarray:
    """Log-mel-like values in Whisper's normalised range [-1.5, 1.5]."""
    return rng.uniform(-1.5, 1.5, (chunks, cfg.whisper.num_mel_bins, cfg.whisper.num_frames)).astype(np.float32)


def tiny_train_data(d, n: int = 24, seed: int = 0):
    """A few 1-2 s tones with one-word answers, and a byte-level BPE with Qwen's special tokens
    trained here on the template text: enough to run the training loop on the tiny model."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mufun_jax.data.templates import SYSTEM

    d = Path(d)
    rng = np.random.default_rng(seed)
    words = ["low", "middle", "high"]
    records = []
    for i in range(n):
        t = np.arange(int(16000 * rng.uniform(1.0, 2.0))) / 16000
        np.save(d / f"a{i}.npy", (0.3 * np.sin(2 * np.pi * 220 * 2 ** (i % 3) * t)).astype(np.float32))
        records.append({"id": f"s{i}", "audio": f"a{i}.npy", "conversations": [
            {"from": "human", "value": "<audio>\nHow high is the note?"},
            {"from": "gpt", "value": f"It is {words[i % 3]}."}]})
    (d / "train.json").write_text(json.dumps(records))
    (d / "eval.json").write_text(json.dumps(records[:6]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [SYSTEM + " USER: <audio>\nHow high is the note? ASSISTANT: It is " + w + ".<|im_end|>" for w in words] * 10
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
                            ).save_pretrained(str(d / "tok"))
    return d
