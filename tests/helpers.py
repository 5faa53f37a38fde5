"""Shared builders for tests: a JAX MuFun and the torch reference with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from mufun_jax.config import MuFunConfig


# mufun-tiny with a narrower, shallower Whisper: the training tests compile and run ~4x faster.
SMALL_WHISPER = dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64)
SMALL_MODEL = {"preset": "mufun-tiny", "whisper": SMALL_WHISPER, "taps": [0, 1, 2], "connector_type": "blp_3i_2x"}


def small_cfg() -> MuFunConfig:
    from mufun_jax.config import WhisperConfig, preset

    return preset("mufun-tiny").replace(whisper=WhisperConfig(num_mel_bins=128, **SMALL_WHISPER), taps=(0, 1, 2),
                                        connector_type="blp_3i_2x")


def bench_script(name: str):
    """``bench/NAME.py`` imported as a module from its file: bench/ holds scripts, not a package on
    the import path, and tests do not edit ``sys.path``."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jax_mufun_from_torch(ref, cfg: MuFunConfig, run=None):
    """``mufun_jax.testing.torch_reference.jax_mufun_from_torch`` (its callers hold a torch model already)."""
    from mufun_jax.testing.torch_reference import jax_mufun_from_torch as build  # torch: only where a test uses it

    return build(ref, cfg, run)


def random_mel(rng: np.random.Generator, chunks: int, cfg: MuFunConfig) -> np.ndarray:
    """Log-mel-like values in Whisper's normalised range [-1.5, 1.5]."""
    return rng.uniform(-1.5, 1.5, (chunks, cfg.whisper.num_mel_bins, cfg.whisper.num_frames)).astype(np.float32)


def tiny_train_data(d, n: int = 24, seed: int = 0):
    """A few 1-2 s tones with one-word answers, and a byte-level BPE with Qwen's special tokens
    trained here on the template text: enough to run the training loop on the tiny model."""
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


LM_HEAD_SCALE = 4.0  # spreads the logits so that greedy choices are far from ties (checked in test_generate)


def trained_spans(ids, labels):
    """Contiguous runs of trained (non -100) positions, as lists of ids."""
    from mufun_jax.config import IGNORE_INDEX

    spans, cur = [], []
    for i, l in zip(ids, labels):
        if l == IGNORE_INDEX:
            if cur:
                spans.append(cur)
                cur = []
        else:
            assert l == i
            cur.append(i)
    return spans + ([cur] if cur else [])


# -- the training step on synthetic packed samples (test_train, test_lora, test_train_sharded) -----

CFG = small_cfg()


def make_samples(rng, n, vocab=CFG.qwen3.vocab_size):
    """``n`` random samples: a few text tokens around one audio placeholder, 0.5-1.5 s of noise, and
    a trained answer."""
    from mufun_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX as AUDIO
    from mufun_jax.data.dataset import Sample

    out = []
    for i in range(n):
        q = [int(x) for x in rng.integers(1, vocab, int(rng.integers(3, 8)))]
        a = [int(x) for x in rng.integers(1, vocab, int(rng.integers(2, 6)))]
        ids = q[:2] + [AUDIO] + q[2:] + a
        labels = [IGNORE_INDEX] * (len(q) + 1) + a
        chunks = [[(0.1 * rng.standard_normal(int(rng.integers(8000, 24000)))).astype(np.float32)]]
        out.append(Sample(f"x{i}", ids, labels, chunks))
    return out


def train_cfg(**kw):
    from mufun_jax.train_config import TrainConfig

    base = dict(max_steps=10, trainable={"whisper": "full", "connector": "full", "llm": "full"},
                optim=dict(lr=1e-3, warmup_ratio=0.0), data=dict(batch_size=2, seq_len=640, max_chunks=4))
    base.update(kw)
    return TrainConfig.from_dict(base)


def one_device_mesh():
    import jax

    from mufun_jax.sharding import make_mesh

    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


# -- train() end to end in a subprocess (test_train_resume, test_lora) ------------------------------

ROOT = Path(__file__).resolve().parents[1]

RUNNER = textwrap.dedent(r"""
    import json, os, signal, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    from mufun_jax.train_config import TrainConfig
    from mufun_jax import train_lib

    cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
    mode, at = sys.argv[2], int(sys.argv[3])

    def signal_in_save(sig):
        # send sig once checkpoint `at` is written, before Orbax commits it
        from orbax.checkpoint._src.path import atomicity
        original = atomicity.AtomicRenameTemporaryPath.finalize
        async def finalize(self, *a, **k):
            if self._final_path.name == str(at):
                os.kill(os.getpid(), sig)
            return await original(self, *a, **k)
        atomicity.AtomicRenameTemporaryPath.finalize = finalize

    hook = None
    if mode == "kill_after_step":  # a real SIGKILL, in the middle of the run
        hook = lambda step, m: os.kill(os.getpid(), signal.SIGKILL) if step == at else None
    elif mode == "term_twice_in_save":  # the notice, then another SIGTERM while the checkpoint is being written
        hook = lambda step, m: os.kill(os.getpid(), signal.SIGTERM) if step == at else None
        signal_in_save(signal.SIGTERM)
    elif mode == "kill_in_save":  # SIGKILL once the checkpoint's data is written, before it is committed
        signal_in_save(signal.SIGKILL)
    result = train_lib.train(cfg, on_step=hook, profile=mode == "profile")
    if result.get("preempted"):
        print("PREEMPTED", result["step"], result["notice_to_commit_s"])
        sys.exit(train_lib.EXIT_PREEMPTED)
    print("RUN_DONE")
""")


def run_config(data, out, **kw) -> dict:
    """A 6-step train() config of the small model on ``tiny_train_data``; ``optim``/``data`` merge."""
    d = dict(output_dir=str(out), model=dict(SMALL_MODEL), max_steps=6, save_every=2, keep=5, seed=0,
             progress=False, optim=dict(lr=1e-3, warmup_ratio=0.2),
             data=dict(dataset=str(data / "train.json"), tokenizer=str(data / "tok"), batch_size=2, seq_len=512,
                       max_chunks=2))
    for k, v in kw.items():
        if k in ("optim", "data"):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return d


def run_train(cfg: dict, mode="plain", at=0, expect_ok=True):
    """train() in a fresh process (RUNNER): the process boundary is what a kill or a notice tests."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(cfg), mode, str(at)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    if expect_ok:
        assert r.returncode == 0 and "RUN_DONE" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def losses(out) -> list[tuple[int, float]]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def committed(out) -> list[int]:
    return sorted(int(p.name) for p in (Path(out) / "checkpoints").iterdir() if p.name.isdigit())


def tiny_model_dir(d: Path, texts: list[str], seed: int = 3) -> Path:
    """A saved model directory (``d / "model"``): the small Whisper, a byte-level BPE trained on
    ``texts``, random weights with the LM head scaled by 8 (greedy choices far from ties, varied)."""
    import dataclasses

    from flax import nnx

    from mufun_jax.checkpoint import save_model
    from mufun_jax.data.tokenizer import build_tokenizer
    from mufun_jax.models import MuFun

    tok = build_tokenizer(texts, d / "tok", vocab_size=400)
    cfg = small_cfg()
    cfg = cfg.replace(qwen3=dataclasses.replace(cfg.qwen3, vocab_size=len(tok)))
    params = nnx.to_pure_dict(nnx.state(MuFun(cfg, rngs=nnx.Rngs(seed))))
    head = params["language_model"]["lm_head"]
    head["kernel"] = np.asarray(head["kernel"]) * 8.0
    save_model(d / "model", cfg, params, tokenizer=tok)
    return d / "model"
