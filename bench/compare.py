#!/usr/bin/env python3
"""One table, one run: this JAX implementation against the PyTorch reference, on the same model and data.

Both sides use the same small MuFun (``--tiny`` for a smoke-test size):

- Whisper encoder shaped like whisper-tiny (d_model 384, 4 layers, 6 heads, FFN 1536, 128 mel bins),
  taps (0, 2, 3, 4) (HF numbering; 4 is the last block after the final LayerNorm) and the
  ``blp_4i_2x`` connector, AvgPool stride 5 (300 audio tokens per 30 s chunk);
- a Qwen3 of 4 layers, width 512 (FFN 1536, 8 query / 4 KV heads of 64) and a 32k vocabulary
  (32,000: the real 151,936 would make the LM head 4/5 of every FLOP at this width);
- one synthetic dataset: clips of 5-120 s (1-4 chunks of 30 s) rendered with numpy, prompts of 40-80
  random tokens around one ``<audio>``, answers of 5-200 random tokens (labels on the answers).

Rows (each measured for both sides, with the ratio ours / reference):

1. full training: samples/s and label tokens/s in steady state, after warm-up and compile. Ours: our
   ``Trainer`` on ``pack_batches`` batches (packing on; rows x seq_len x max_chunks chosen by the
   analytic cost model below over a small grid, on this dataset's length mix). Reference: the
   reference's padding (right-padded batches of ``ref_batch`` samples, padded to the longest),
   ``Qwen3ForCausalLM(labels=...)`` loss, ``torch.optim.AdamW`` (fused), global-norm clipping, gradient
   accumulation, full fine-tuning, sdpa attention. Both include their host work per step (packing /
   WhisperFeatureExtractor and splicing). Our compile time is reported separately.
2. the warmup recipe: only the connector trains (reference: ``requires_grad=False`` on Whisper and the LLM).
3. inference, answers/s for 16 requests (one clip each, per-request answer caps of 5-200 tokens,
   greedy): ``mufun_jax.MuFun.generate`` against the reference ``chat()`` loop (one at a time, HF
   ``generate``) and against one HF batched ``generate`` (left-padded). The reference side is
   ``bench/inference.py``'s ``Reference`` (subclassed: token ids out, per-request caps, device placement).
4. peak RSS of each side during full training: each training side runs in its own child process,
   which reads ``ru_maxrss`` right after the full-training row.
5. input pipeline, 30 s chunks/s: decode + resample (soundfile + soxr, flac 44.1 kHz stereo) + log-mel,
   with ``WhisperFeatureExtractor`` on the host (reference) or our jitted ``audio.log_mel_spectrogram``
   on the device (ours).

Method: the two training sides run alternately (``--repeats`` rounds, the order swapped every round),
each in a fresh child process (so peak RSS and compile time are per round). For inference and the input
pipeline each side has one long-lived child (ours compiles once), and the parent alternates the systems
round by round. No process ever holds both runtimes. Reported: median and min-max over rounds, and the
training rows' process CPU seconds per sample (less sensitive to other load than wall time).

FLOPs are counted analytically (per sample, no padding): 6 N per token for trained weights, 2 N for
frozen weights whose input needs no gradient (Whisper in the warmup recipe), 4 N for frozen weights that
gradients pass through (the LLM in the warmup recipe: forward + input gradients), attention score/value
products at 2 N each way (x3 with a backward pass), the LM head over every position (both sides compute
it there). Achieved FLOP/s = useful FLOPs / time; with ``--peak-tflops`` also MFU. ``--profile`` adds a
table of the pieces (encoder forward, encoder forward+backward, LLM layers forward+backward, LM head +
loss) timed on each side at equal shapes, which tells whether a gap is in the kernels or in the work
done (padding, recompute).

Our side's settings on CPU: fp32, remat ``dots_no_batch`` and at most 8 chunks per packed batch. Without
remat a 16-chunk step needs about 21 GB (XLA materialises Whisper's fp32 attention scores for every chunk
and layer). Whisper runs as one scan that collects its taps on the side, so remat covers every layer:
the compiled temp memory of the audio path's forward + backward at 8 chunks is 2.3 GiB with remat
"full" (6.8 GiB without), whatever the taps. (When the layers were scanned in pieces split at the
taps, the one-layer pieces lost their remat: 4.1 GiB for taps (0, 2, 3, 4) and 7.7 GiB for taps
(0, 1, 2, 3, 4) with remat "full".) On GPU: bf16 compute, up to 32 chunks per batch. The reference
(sdpa attention, which does not materialise the scores on CPU) needs neither.

    python bench/compare.py                 # full settings, CPU, 3 rounds -> bench/results.{json,md}
    python bench/compare.py --tiny --repeats 1 --parallel --out /tmp/x   # smoke test (~40 s on 2 idle cores)
    python bench/compare.py --device gpu --peak-tflops 989       # GPU: bf16 compute both sides, MFU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import numpy as np  # noqa: E402

RESULT_TAG = "@@COMPARE_RESULT@@ "
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
        """Our run settings: remat, and bf16 compute on GPU."""
        return {"remat_policy": self.remat, "dtype": "bfloat16" if self.device == "gpu" else "float32"}

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


# -- synthetic data ---------------------------------------------------------------------------------


def synth_wave(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A 16 kHz clip: two tones and a little noise."""
    n = int(seconds * 16000)
    t = np.arange(n, dtype=np.float32) / np.float32(16000)
    f1, f2 = rng.uniform(80, 1000, 2).astype(np.float32)
    x = 0.2 * np.sin(np.float32(2 * np.pi) * f1 * t) + 0.1 * np.sin(np.float32(2 * np.pi) * f2 * t)
    return (x + 0.05 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)


def make_samples(s: Settings, n: int, seed: int, *, audio: bool = True) -> list:
    """``n`` training samples: one clip each (its 30 s waveform chunks; with ``audio=False`` 1-sample
    stand-ins, for packing simulations), prompt tokens around one -200, answer tokens as labels."""
    from mufun_jax import audio as audio_lib
    from mufun_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from mufun_jax.data.dataset import Sample

    rng = np.random.default_rng(seed)
    vocab = s.qwen3["vocab_size"]
    out = []
    for i in range(n):
        secs = float(rng.uniform(*s.clip_s))
        p = int(rng.integers(s.prompt_tokens[0], s.prompt_tokens[1] + 1))
        a = int(rng.integers(s.answer_tokens[0], s.answer_tokens[1] + 1))
        q = [int(x) for x in rng.integers(3, vocab, p)]
        ans = [int(x) for x in rng.integers(3, vocab, a)]
        cut = int(rng.integers(p // 2, p + 1))
        ids = q[:cut] + [IMAGE_TOKEN_INDEX] + q[cut:] + ans
        labels = [IGNORE_INDEX] * (p + 1) + ans
        if audio:
            chunks = audio_lib.chunk(synth_wave(rng, secs))
        else:  # the chunk count of such a clip, without rendering it
            full = int(secs * 16000)
            k = max(1, math.ceil(full / audio_lib.CHUNK_SAMPLES))
            if k > 1 and full - (k - 1) * audio_lib.CHUNK_SAMPLES <= audio_lib.MIN_TAIL_SAMPLES:
                k -= 1
            chunks = [np.zeros(1, np.float32)] * k
        out.append(Sample(f"s{seed}-{i}", ids, labels, [list(chunks)]))
    return out


def label_tokens(samples) -> int:
    return sum(sum(1 for t in s.labels if t >= 0) for s in samples)


# -- analytic FLOPs ---------------------------------------------------------------------------------


# The formulas are mufun_jax.flops (shared with the AOT reports); "useful" FLOPs count each sample's
# own tokens (no padding) and the causal triangle of its attention.

TRAINABLE = {"full": {"whisper": "full", "connector": "full", "llm": "full"},
             "warmup": {"whisper": "frozen", "connector": "full", "llm": "frozen"}}


def expanded(cfg, smp) -> int:
    return len(smp.input_ids) - len(smp.chunks) + cfg.tokens_per_chunk * sum(smp.chunks_per_audio)


def train_flops(cfg, samples, mode: str) -> float:
    """Useful training FLOPs of ``samples`` (no padding). ``mode``: full | warmup (connector only)."""
    from mufun_jax import flops

    return sum(flops.train_flops(cfg, TRAINABLE[mode], sum(x.chunks_per_audio), [expanded(cfg, x)]) for x in samples)


def computed_train_flops(cfg, chunks: int, rows: int, seq_len: int, mode: str = "full") -> float:
    """FLOPs of one step as computed, padding included: ``chunks`` chunks through the encoder and
    ``rows`` x ``seq_len`` tokens through the LLM, attention over every row's whole square (a packed
    row's segment mask and a padded batch's attention mask both leave the full square computed).
    Remat recomputation is not included."""
    from mufun_jax import flops

    return flops.train_flops(cfg, TRAINABLE[mode], chunks, [seq_len] * rows, attention="square")


def infer_flops(cfg, n_chunks: int, prompt_len: int, new_tokens: int) -> float:
    """Useful FLOPs of one answer: encoder, connector, prefill (the head on the last position only),
    then one decode step per generated token after the first."""
    from mufun_jax import flops

    return flops.answer_flops(cfg, n_chunks, prompt_len, new_tokens)


def choose_packing(s: Settings, cfg) -> tuple[tuple[int, int, int], list]:
    """The (rows, seq_len, max_chunks) of ``s.pack_grid`` with the fewest computed FLOPs per sample
    on this dataset's length mix (a 64-sample draw that is not the timed one)."""
    from mufun_jax.data.packing import PackConfig, pack_batches

    samples = make_samples(s, 64, s.seed + 7, audio=False)
    longest = max(expanded(cfg, x) for x in samples)
    most = max(sum(x.chunks_per_audio) for x in samples)
    table = []
    for r, t, c in s.pack_grid:
        if t < longest or c < most:
            continue
        batches = list(pack_batches(samples, PackConfig(batch_size=r, seq_len=t, max_chunks=c)))
        table.append(((r, t, c), len(batches) * computed_train_flops(cfg, c, r, t) / len(samples)))
    table.sort(key=lambda x: x[1])
    return table[0][0], table


# -- facts ------------------------------------------------------------------------------------------


def _rss_mb() -> float:
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


# -- child: our training ----------------------------------------------------------------------------


def ours_train(s: Settings, mode: str, samples, warm) -> dict:
    import jax

    from mufun_jax.data.packing import PackConfig, pack_batches
    from mufun_jax.sharding import make_mesh
    from mufun_jax.train_config import TrainConfig
    from mufun_jax.train_lib import Trainer

    cfg = model_config(s)
    (rows, seq_len, max_chunks), _ = choose_packing(s, cfg)
    trainable = ({"whisper": "full", "connector": "full", "llm": "full"} if mode == "full"
                 else {"whisper": "frozen", "connector": "full", "llm": "frozen"})
    tcfg = TrainConfig.from_dict(dict(max_steps=10_000, trainable=trainable, progress=False,
                                      optim=dict(lr=2e-5, warmup_ratio=0.0, schedule="constant"),
                                      data=dict(batch_size=rows, seq_len=seq_len, max_chunks=max_chunks)))
    pack = PackConfig(batch_size=rows, seq_len=seq_len, max_chunks=max_chunks, pad_token_id=0,
                      tokens_per_chunk=cfg.tokens_per_chunk)
    trainer = Trainer(tcfg, cfg, make_mesh(1, 1, 1, devices=jax.devices()[:1]), run_settings(s))
    state = trainer.init_state(jax.random.key(s.seed))
    jax.block_until_ready(state)
    log(f"ours {mode}: initialised; packing {rows}x{seq_len}, {max_chunks} chunks")
    warm_batches = list(pack_batches(warm, pack))
    t0 = time.perf_counter()
    step = trainer.train_step.lower(state, trainer.global_batch(warm_batches[:1])).compile()
    compile_s = time.perf_counter() - t0
    log(f"ours {mode}: compiled in {compile_s:.1f} s")
    state, m = step(state, trainer.global_batch(warm_batches[:1]))  # warm-up: the first run (allocations)
    jax.block_until_ready(m)
    losses, step_s, n_samples, n_steps = [], [], 0, 0
    t_start, c_start = time.perf_counter(), time.process_time()
    for b in pack_batches(samples, pack):  # host packing is inside the timed loop, as in training
        t0 = time.perf_counter()
        state, m = step(state, trainer.global_batch([b]))
        losses.append(float(jax.device_get(m["loss"])))  # the train loop fetches metrics every step
        step_s.append(time.perf_counter() - t0)
        n_samples += len(b["sample_ids"])
        n_steps += 1
    elapsed, cpu = time.perf_counter() - t_start, time.process_time() - c_start
    log(f"ours {mode}: {n_steps} steps, {n_samples} samples in {elapsed:.1f} s")
    assert n_samples == len(samples), (n_samples, len(samples))
    flops = train_flops(cfg, samples, mode)
    return {"samples_per_s": n_samples / elapsed, "label_tokens_per_s": label_tokens(samples) / elapsed,
            "elapsed_s": elapsed, "cpu_s": cpu, "steps": n_steps, "samples": n_samples, "step_s": step_s,
            "compile_s": compile_s, "useful_flops": flops, "achieved_flops_per_s": flops / elapsed,
            "computed_flops": n_steps * computed_train_flops(cfg, max_chunks, rows, seq_len, mode),
            "loss_first": losses[0], "loss_last": losses[-1], "packing": [rows, seq_len, max_chunks]}


def _device_mem_jax() -> dict:
    import jax

    try:
        st = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - the CPU backend may not report
        st = {}
    return {"peak_device_mem_mb": st["peak_bytes_in_use"] / 2**20} if "peak_bytes_in_use" in st else {}


def ours_train_child(s: Settings) -> dict:
    samples = make_samples(s, s.train_samples, s.seed)
    warm = make_samples(s, s.warm_samples, s.seed + 1)
    out = {"facts": jax_facts()}
    out["train_full"] = ours_train(s, "full", samples, warm)
    out["peak_rss_mb"] = _rss_mb()
    out.update(_device_mem_jax())
    out["train_warmup"] = ours_train(s, "warmup", samples, warm)
    return out


# -- child: the reference's training ----------------------------------------------------------------


def build_reference(cfg, seed: int = 3, device: str = "cpu"):
    """``tests/torch_reference.TorchMuFun`` with sdpa attention (the fastest HF attention on CPU)."""
    import torch

    from torch_reference import TorchMuFun

    ref = TorchMuFun(cfg, seed=seed)
    for m in (ref.vision_tower._vision_tower, ref.language_model):
        m.set_attn_implementation("sdpa")
    return ref.to("cuda" if device == "gpu" else "cpu").to(torch.float32)


def autocast(device: str):
    """bf16 autocast on the GPU (what HF Trainer's bf16=True does); nothing on the CPU (fp32)."""
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "gpu" else contextlib.nullcontext()


def ref_forward(ref, fe, samples, device):
    """TinyLLaVA's training forward: every chunk of the batch through the encoder at once, splice at
    -200, right-pad embeddings (zeros) and labels (-100) to the longest row, HF loss."""
    import torch

    from mufun_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    dev = "cuda" if device == "gpu" else "cpu"
    chunks = [c for smp in samples for per in smp.chunks for c in per]
    mel = fe(chunks, sampling_rate=16000, return_tensors="np").input_features
    with autocast(device):
        feats = ref.encode_images(torch.from_numpy(mel).to(dev))  # (chunks, 300, H)
    embed = ref.language_model.get_input_embeddings()
    limit = ref.cfg.tokenizer_model_max_length
    rows, labs, ci = [], [], 0
    for smp in samples:
        ids = torch.tensor(smp.input_ids, device=dev)
        lab = torch.tensor(smp.labels, device=dev)
        where = torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten().tolist()
        pieces, lp, start = [], [], 0
        for pos, k in zip(where, smp.chunks_per_audio):
            pieces.append(embed(ids[start:pos]))
            lp.append(lab[start:pos])
            f = feats[ci:ci + k].reshape(-1, feats.shape[-1]).to(pieces[-1].dtype)
            ci += k
            pieces.append(f)
            lp.append(torch.full((f.shape[0],), IGNORE_INDEX, device=dev))
            start = pos + 1
        pieces.append(embed(ids[start:]))
        lp.append(lab[start:])
        rows.append(torch.cat(pieces)[:limit])
        labs.append(torch.cat(lp)[:limit])
    t = max(r.shape[0] for r in rows)
    embeds = torch.zeros(len(rows), t, rows[0].shape[-1], device=dev, dtype=rows[0].dtype)
    labels = torch.full((len(rows), t), IGNORE_INDEX, device=dev, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long, device=dev)
    for i, (r, lb) in enumerate(zip(rows, labs)):
        embeds[i, :len(r)] = r
        labels[i, :len(r)] = lb
        mask[i, :len(r)] = 1
    with autocast(device):
        return ref.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss


def ref_train(s: Settings, mode: str, samples, warm) -> dict:
    import torch
    from transformers import WhisperFeatureExtractor

    cfg = model_config(s)
    ref = build_reference(cfg, seed=s.seed, device=s.device)
    ref.train()
    if mode == "warmup":
        for p in list(ref.vision_tower.parameters()) + list(ref.language_model.parameters()):
            p.requires_grad_(False)
    params = [p for p in ref.parameters() if p.requires_grad]
    try:
        opt = torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError):  # fused not available for this device
        opt = torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    fe = WhisperFeatureExtractor(feature_size=cfg.whisper.num_mel_bins)
    sync = torch.cuda.synchronize if s.device == "gpu" else (lambda: None)

    def run(batches):
        losses, step_s = [], []
        for i in range(0, len(batches), s.ref_accum):
            t0 = time.perf_counter()
            group = batches[i:i + s.ref_accum]
            tot = 0.0
            for b in group:
                loss = ref_forward(ref, fe, b, s.device) / len(group)
                loss.backward()
                tot += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            losses.append(tot)
            step_s.append(time.perf_counter() - t0)
        return losses, step_s

    batch = lambda xs: [xs[i:i + s.ref_batch] for i in range(0, len(xs), s.ref_batch)]
    log(f"ref {mode}: built")
    run(batch(warm))
    log(f"ref {mode}: warmed up")
    t0, c0 = time.perf_counter(), time.process_time()
    losses, step_s = run(batch(samples))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    log(f"ref {mode}: {len(step_s)} steps, {len(samples)} samples in {elapsed:.1f} s")
    flops = train_flops(cfg, samples, mode)
    computed = sum(computed_train_flops(cfg, sum(sum(x.chunks_per_audio) for x in b), len(b),
                                        min(max(expanded(cfg, x) for x in b), cfg.tokenizer_model_max_length), mode)
                   for b in batch(samples))
    return {"samples_per_s": len(samples) / elapsed, "label_tokens_per_s": label_tokens(samples) / elapsed,
            "elapsed_s": elapsed, "cpu_s": cpu, "steps": len(step_s), "samples": len(samples), "step_s": step_s,
            "useful_flops": flops, "achieved_flops_per_s": flops / elapsed, "computed_flops": computed,
            "loss_first": losses[0], "loss_last": losses[-1], "batch": [s.ref_batch, s.ref_accum]}


def ref_train_child(s: Settings) -> dict:
    import torch

    samples = make_samples(s, s.train_samples, s.seed)
    warm = make_samples(s, s.warm_samples, s.seed + 1)
    torch.manual_seed(0)
    out = {"facts": torch_facts()}
    out["train_full"] = ref_train(s, "full", samples, warm)
    out["peak_rss_mb"] = _rss_mb()
    if s.device == "gpu":
        out["peak_device_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["train_warmup"] = ref_train(s, "warmup", samples, warm)
    return out


# -- children: inference and the input pipeline ------------------------------------------------------
#
# Two long-lived children, one per side, so that neither process holds the other's runtime and our
# side compiles once: the parent sends one command per line and alternates the systems round by round.


def make_reference_engine(ref, tok, stop_ids, device: str):
    """``bench/inference.py``'s ``Reference`` (the reference ``chat()`` recipe: load, WhisperFeatureExtractor,
    template, splice, HF ``generate``), returning token ids, with a per-request answer cap and device
    placement."""
    from inference import Reference

    class RefEngine(Reference):
        def __init__(self):
            super().__init__(ref, tok, stop_ids, 1)
            self.dev = "cuda" if device == "gpu" else "cpu"

        def inputs(self, req):
            if self.dev == "cpu":
                return super().inputs(req)
            return self.device_inputs(req)

        def device_inputs(self, req):  # Reference.inputs, built on self.dev
            import torch

            from mufun_jax import audio
            from mufun_jax.config import IMAGE_TOKEN_INDEX
            from mufun_jax.data.templates import get_template, tokenize_with_audio

            chunks = audio.chunk(audio.load_audio(req["audio"]))
            mel = torch.from_numpy(self.fe(chunks, sampling_rate=16000, return_tensors="np").input_features)
            text = get_template("qwen2_instruct").render([("<audio>\n" + req["prompt"], None)])
            ids = torch.tensor(tokenize_with_audio(text, self.tok), device=self.dev)
            at = int(torch.nonzero(ids == IMAGE_TOKEN_INDEX)[0])
            embed = self.ref.language_model.get_input_embeddings()
            feats = self.ref.encode_images(mel.to(self.dev).to(next(self.ref.parameters()).dtype))
            return torch.cat([embed(ids[:at]), feats.reshape(-1, feats.shape[-1]), embed(ids[at + 1:])])

        def _gen(self, embeds, mask, n):
            return self.ref.language_model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n,
                                                    do_sample=False, eos_token_id=self.stop, pad_token_id=0)

        def chat_ids(self, req) -> list[int]:
            import torch

            with torch.no_grad():
                embeds = self.inputs(req)[None]
                out = self._gen(embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
                                req["max_new_tokens"])
            return [int(t) for t in out[0]]

        def batched_ids(self, reqs) -> list[list[int]]:
            import torch

            with torch.no_grad():
                rows = [self.inputs(r) for r in reqs]
                t = max(len(r) for r in rows)
                embeds = torch.zeros(len(rows), t, rows[0].shape[-1], device=rows[0].device, dtype=rows[0].dtype)
                mask = torch.zeros(len(rows), t, dtype=torch.long, device=rows[0].device)
                for i, r in enumerate(rows):  # left padding, as batched HF generation needs
                    embeds[i, t - len(r):] = r
                    mask[i, t - len(r):] = 1
                out = self._gen(embeds, mask, max(r["max_new_tokens"] for r in reqs))
            # the batch runs to the longest cap (as rows that stop early do); each keeps its own cap
            return [[int(x) for x in o[:r["max_new_tokens"]]] for o, r in zip(out, reqs)]

    return RefEngine()


def pipeline_ref(path, fe):
    """Decode + resample + WhisperFeatureExtractor: (chunks, decode s, mel s)."""
    from mufun_jax import audio

    t0 = time.perf_counter()
    chunks = audio.chunk(audio.load_audio(path))
    t1 = time.perf_counter()
    fe(chunks, sampling_rate=16000, return_tensors="np")
    return len(chunks), t1 - t0, time.perf_counter() - t1


def pipeline_ours(path, mel_fn):
    """Decode + resample on the host, jitted log-mel on the device: (chunks, decode s, mel s)."""
    import jax

    from mufun_jax import audio

    t0 = time.perf_counter()
    waves = audio.pad_chunks(audio.chunk(audio.load_audio(path)))
    t1 = time.perf_counter()
    mel_fn(jax.device_put(waves)).block_until_ready()
    return len(waves), t1 - t0, time.perf_counter() - t1


def _request_fields(r: dict) -> dict:
    return {k: v for k, v in r.items() if k in ("id", "prompt", "audio", "max_new_tokens")}


def ref_infer_child(s: Settings, workdir: str):
    """The reference side; it also writes the shared inputs (weights, tokenizer, clips) to ``workdir``."""
    import soundfile as sf
    import torch
    from transformers import WhisperFeatureExtractor

    from mufun_jax import audio
    from mufun_jax.data.templates import get_template, tokenize_with_audio
    from mufun_jax.data.tokenizer import build_tokenizer

    wd = Path(workdir)
    cfg = model_config(s)
    rng = np.random.default_rng(s.seed + 11)
    words = "genre jazz rock piano guitar drums tempo fast slow bright dark happy sad loud quiet song".split()
    tok = build_tokenizer([" ".join(rng.choice(words, 6)) for _ in range(200)], wd / "tok", vocab_size=512)
    ref = build_reference(cfg, seed=3, device="cpu")
    with torch.no_grad():
        ref.language_model.lm_head.weight.mul_(4.0)  # decisive argmaxes, so both sides pick the same tokens
    np.savez(wd / "weights.npz", **ref.combined_state_dict())
    if s.device == "gpu":
        ref = ref.to("cuda").to(torch.bfloat16)
    stop_ids = [2, 0]  # <|im_end|>, <|endoftext|> of build_tokenizer; mufun_jax.MuFun finds the same
    requests = []
    for i in range(s.n_requests):
        secs = float(rng.uniform(*s.clip_s))
        wave = synth_wave(rng, secs)
        sf.write(wd / f"clip{i}.wav", wave, 16000, subtype="FLOAT")
        cap = int(rng.integers(s.answer_tokens[0], s.answer_tokens[1] + 1))
        req = {"id": i, "prompt": PROMPTS[i % len(PROMPTS)], "audio": str(wd / f"clip{i}.wav"), "max_new_tokens": cap}
        ids = tokenize_with_audio(get_template("qwen2_instruct").render([("<audio>\n" + req["prompt"], None)]), tok)
        k = len(audio.chunk(wave))
        requests.append({**req, "chunks": k, "prompt_tokens": len(ids) - 1 + cfg.tokens_per_chunk * k})
    (wd / "requests.json").write_text(json.dumps(requests))
    n = s.pipeline_chunks
    t = np.arange(44100 * 30 * n, dtype=np.float32) / np.float32(44100)
    music = 0.2 * np.sin(np.float32(2 * np.pi * 220) * t) + 0.05 * rng.standard_normal(t.size, dtype=np.float32)
    sf.write(wd / "music.flac", np.stack([music, 0.8 * music], 1), 44100)
    import tagging

    tagging.make_requests(s, wd, rng, tok, cfg, synth_wave)
    reference = make_reference_engine(ref, tok, stop_ids, s.device)
    reqs = [_request_fields(r) for r in requests]
    if s.device == "cpu":  # the device-aware splice (used on GPU) equals Reference.inputs
        with torch.no_grad():
            a, b = reference.inputs(reqs[0]), reference.device_inputs(reqs[0])
        assert a.shape == b.shape and float((a - b).abs().max()) < 1e-5, "device_inputs != Reference.inputs"
    reference.chat_ids(dict(reqs[0], max_new_tokens=2))  # warm-up (allocator, thread pool)
    reference.batched_ids([dict(r, max_new_tokens=2) for r in reqs[:2]])
    fe = WhisperFeatureExtractor(feature_size=cfg.whisper.num_mel_bins)
    pipeline_ref(wd / "music.flac", fe)
    log("ref infer: ready")

    def timed(fn):
        t0 = time.perf_counter()
        ids = fn()
        return {"seconds": time.perf_counter() - t0, "token_ids": ids}

    return {
        "facts": torch_facts,
        "chat": lambda: timed(lambda: [reference.chat_ids(r) for r in reqs]),
        "batched": lambda: timed(lambda: reference.batched_ids(reqs)),
        "pipeline": lambda: pipeline_ref(wd / "music.flac", fe),
        **tagging.ref_ops(reference, wd, s.engine_batch),
    }


def ours_infer_child(s: Settings, workdir: str):
    import jax
    from flax import nnx

    import mufun_jax
    from mufun_jax import audio
    from mufun_jax.convert import load_params, torch_to_flax
    from mufun_jax.data.dataset import dataset_tokenizer
    from mufun_jax.models import MuFun

    wd = Path(workdir)
    cfg = model_config(s)
    model = MuFun(cfg, run_settings(s).replace(remat_policy="none"), rngs=nnx.Rngs(0))
    with np.load(wd / "weights.npz") as z:
        load_params(model, torch_to_flax(dict(z), cfg))
    tok = dataset_tokenizer(wd / "tok")
    reqs = [_request_fields(r) for r in json.loads((wd / "requests.json").read_text())]
    cap = max(r["max_new_tokens"] for r in reqs)
    limit = cfg.tokenizer_model_max_length
    buckets = tuple(range(256, limit, 256)) + (limit,)  # multiples of 256: little prefill padding
    engine = mufun_jax.MuFun(model, tok, batch_size=s.engine_batch, max_new_tokens=cap, buckets=buckets)
    assert engine.stop_ids == [2, 0], engine.stop_ids
    t0 = time.perf_counter()
    engine.generate(reqs, return_details=True)  # warm-up: compiles every shape these requests need
    first = time.perf_counter() - t0
    mel_fn = jax.jit(lambda w: audio.log_mel_spectrogram(w, cfg.whisper.num_mel_bins))
    pipeline_ours(wd / "music.flac", mel_fn)
    import tagging

    tag_ops, tag_first = tagging.ours_op(model, tok, wd, s, buckets)
    log(f"ours infer: ready (first run, compiles included: {first:.1f} s; tagging {tag_first:.1f} s)")

    def infer():
        t0 = time.perf_counter()
        res = engine.generate(reqs, return_details=True)
        return {"seconds": time.perf_counter() - t0, "token_ids": [r.token_ids for r in res]}

    return {
        "facts": lambda: {**jax_facts(), "first_run_s": first, "compiles": dict(engine.generator.compiles),
                          "buckets": list(buckets), "tagging_first_run_s": tag_first},
        "infer": infer,
        "pipeline": lambda: pipeline_ours(wd / "music.flac", mel_fn),
        **tag_ops,
    }


# -- children: component profile (--profile) ----------------------------------------------------------
#
# The same pieces, same shapes, timed on each side: where does one side lose time to the other?

PROF_CHUNKS = 4  # 30 s chunks through the encoder
PROF_TOKENS = 1536  # one causal sequence through the LLM


def component_flops(cfg) -> dict:
    from mufun_jax import flops

    enc = flops.forward_flops(cfg, PROF_CHUNKS, [])
    llm = flops.forward_flops(cfg, 0, [PROF_TOKENS])
    e = enc["enc_w"] + enc["enc_a"]
    return {"whisper forward": e, "whisper forward+backward": 3 * e,
            "qwen3 layers forward+backward": 3 * (llm["llm_w"] + llm["llm_a"]),
            "lm head + cross-entropy forward+backward": 3 * llm["head"]}


def _best_of(fn, n: int = 3) -> dict:
    """Best wall time (and that call's process CPU time) of ``n`` calls after one warm-up call."""
    fn()
    best = {"wall": float("inf"), "cpu": float("inf")}
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = time.perf_counter() - t0
        if wall < best["wall"]:
            best = {"wall": wall, "cpu": time.process_time() - c0}
    return best


def ours_prof_child(s: Settings, workdir: str):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mufun_jax.models import MuFun
    from mufun_jax.loss import fused_nll_sums

    cfg = model_config(s)
    model = MuFun(cfg, run_settings(s), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    mel = jnp.asarray(rng.uniform(-1, 1, (PROF_CHUNKS, cfg.whisper.num_mel_bins, cfg.whisper.num_frames)), jnp.float32)
    emb = jnp.asarray(rng.standard_normal((1, PROF_TOKENS, cfg.qwen3.hidden_size)), jnp.float32)
    h = jnp.asarray(rng.standard_normal((1, PROF_TOKENS, cfg.qwen3.hidden_size)), jnp.float32)
    tgt = jnp.asarray(rng.integers(0, cfg.qwen3.vocab_size, (1, PROF_TOKENS)), jnp.int32)
    seg = jnp.ones((1, PROF_TOKENS), jnp.int32)
    enc_gd, enc_st = nnx.split(model.encoder)
    lm_gd, lm_st = nnx.split(model.language_model)
    enc_loss = lambda st, x: sum(jnp.sum(y) for y in nnx.merge(enc_gd, st)(x))
    lm_loss = lambda st, x: jnp.sum(nnx.merge(lm_gd, st).hidden_states(x, segment_ids=seg)[0])
    head_loss = lambda st, x: fused_nll_sums(nnx.merge(lm_gd, st).head_matrix(), x, tgt)[0]  # as training
    fns = {
        "whisper forward": (jax.jit(enc_loss), (enc_st, mel)),
        "whisper forward+backward": (jax.jit(jax.value_and_grad(enc_loss)), (enc_st, mel)),
        "qwen3 layers forward+backward": (jax.jit(jax.value_and_grad(lm_loss, argnums=(0, 1))), (lm_st, emb)),
        "lm head + cross-entropy forward+backward": (jax.jit(jax.value_and_grad(head_loss, argnums=(0, 1))),
                                                     (lm_st, h)),
    }
    run = {k: (lambda f=f, a=a: jax.block_until_ready(f(*a))) for k, (f, a) in fns.items()}
    for f in run.values():
        f()  # compile
    log("ours profile: compiled")
    return {"run": lambda: {k: _best_of(f) for k, f in run.items()}}


def ref_prof_child(s: Settings, workdir: str):
    import torch

    cfg = model_config(s)
    ref = build_reference(cfg, seed=0, device=s.device)
    ref.train()
    dev = "cuda" if s.device == "gpu" else "cpu"
    g = torch.Generator().manual_seed(0)
    mel = (torch.rand(PROF_CHUNKS, cfg.whisper.num_mel_bins, cfg.whisper.num_frames, generator=g) * 2 - 1).to(dev)
    emb = torch.randn(1, PROF_TOKENS, cfg.qwen3.hidden_size, generator=g).to(dev).requires_grad_(True)
    h = torch.randn(PROF_TOKENS, cfg.qwen3.hidden_size, generator=g).to(dev).requires_grad_(True)
    tgt = torch.randint(0, cfg.qwen3.vocab_size, (PROF_TOKENS,), generator=g).to(dev)
    enc, lm = ref.vision_tower._vision_tower, ref.language_model
    sync = torch.cuda.synchronize if s.device == "gpu" else (lambda: None)

    def enc_fwd():
        with torch.no_grad(), autocast(s.device):
            out = enc(mel, output_hidden_states=True)
            sum(out.hidden_states[i].float().sum() for i in cfg.taps).item()

    def enc_train():
        with autocast(s.device):
            out = enc(mel, output_hidden_states=True)
            loss = sum(out.hidden_states[i].float().sum() for i in cfg.taps)
        loss.backward()
        sync()

    def lm_train():
        with autocast(s.device):
            loss = lm.model(inputs_embeds=emb).last_hidden_state.float().sum()
        loss.backward()
        sync()

    def head_train():
        with autocast(s.device):
            loss = torch.nn.functional.cross_entropy(lm.lm_head(h).float(), tgt, reduction="sum")
        loss.backward()
        sync()

    fns = {"whisper forward": enc_fwd, "whisper forward+backward": enc_train,
           "qwen3 layers forward+backward": lm_train, "lm head + cross-entropy forward+backward": head_train}
    log("ref profile: built")
    return {"run": lambda: {k: _best_of(f) for k, f in fns.items()}}


# -- the child protocol -----------------------------------------------------------------------------


def ours_train_ops(s: Settings, workdir: str):
    return {"run": lambda: ours_train_child(s)}


def ref_train_ops(s: Settings, workdir: str):
    return {"run": lambda: ref_train_child(s)}


CHILDREN = {"ours_train": ours_train_ops, "ref_train": ref_train_ops, "ours_infer": ours_infer_child,
            "ref_infer": ref_infer_child, "ours_prof": ours_prof_child, "ref_prof": ref_prof_child}


def serve(task: str, s: Settings, workdir: str) -> None:
    """Child main loop: set up, say ready, then run one named op per line of stdin."""
    ops = CHILDREN[task](s, workdir)
    print(RESULT_TAG + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        op = line.strip()
        if op:
            print(RESULT_TAG + json.dumps(ops[op]()), flush=True)


CHILD_ENV: dict = {}  # extra environment for the children (--parallel: one torch thread each)


class Child:
    """A child process running :func:`serve`; ``call(op)`` returns the op's JSON result."""

    def __init__(self, task: str, s: Settings, workdir: str, timeout: float):
        env = dict(os.environ)
        if s.device == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(CHILD_ENV)
        self.task, self.timeout, self.t0 = task, timeout, time.perf_counter()
        self.err = tempfile.TemporaryFile(mode="w+")
        spec = json.dumps({"task": task, "settings": dataclasses.asdict(s), "workdir": workdir})
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", spec], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     cwd=str(ROOT), bufsize=1)
        try:
            self._read()  # ready
        except BaseException:
            self.kill()
            raise

    def _read(self) -> dict:
        import select

        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TimeoutError(f"child {self.task} gave no answer in {self.timeout:.0f} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(timeout=30)
                self.err.seek(0)
                raise RuntimeError(f"child {self.task} exited ({self.proc.returncode}):\n{self.err.read()[-6000:]}")
            if line.startswith(RESULT_TAG):
                return json.loads(line[len(RESULT_TAG):])

    def call(self, op: str) -> dict:
        self.proc.stdin.write(op + "\n")
        self.proc.stdin.flush()
        try:
            return self._read()
        except BaseException:
            self.kill()
            raise

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        self.err.close()
        print(f"  {self.task:10s} done, {time.perf_counter() - self.t0:.0f} s", file=sys.stderr, flush=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- parent -----------------------------------------------------------------------------------------


def run_once(task: str, s: Settings, timeout: float) -> dict:
    child = Child(task, s, "", timeout)
    try:
        return child.call("run")
    finally:
        child.close()


def run_training(s: Settings, repeats: int, timeout: float) -> dict:
    train = {"ours": [], "ref": []}
    for rep in range(repeats):
        for side in (("ours", "ref") if rep % 2 == 0 else ("ref", "ours")):
            print(f"training, round {rep + 1}/{repeats}: {side} ...", file=sys.stderr, flush=True)
            train[side].append(run_once(f"{side}_train", s, timeout))
    return train


def _trim(ids, stop_ids) -> list[int]:
    out = []
    for t in ids:
        if t in stop_ids:
            break
        out.append(int(t))
    return out


def run_inference(s: Settings, repeats: int, timeout: float, *, tagging_only: bool = False) -> dict:
    """Inference, the tagging workload and the input pipeline: both sides' children alive at once,
    used alternately (the systems' order rotates every round)."""

    cfg = model_config(s)
    with tempfile.TemporaryDirectory(prefix="mufun-compare-") as wd:
        ref = Child("ref_infer", s, wd, timeout)  # writes the shared inputs first
        ours = None
        try:
            ours = Child("ours_infer", s, wd, timeout)
            requests = json.loads((Path(wd) / "requests.json").read_text())
            tag_requests = json.loads((Path(wd) / "tagging.json").read_text())
            groups = [{"ours": (ours, "tag"), "ref_chat": (ref, "tag_chat"), "ref_batched": (ref, "tag_batched")}]
            if not tagging_only:
                groups.insert(0, {"ours": (ours, "infer"), "ref_chat": (ref, "chat"),
                                  "ref_batched": (ref, "batched")})
            times = [{k: [] for k in g} for g in groups]
            answers = [{} for _ in groups]
            tag_extra = []
            pipe = {"ours": [], "ref": []}
            for rep in range(repeats):
                print(f"inference and input pipeline, round {rep + 1}/{repeats} ...", file=sys.stderr, flush=True)
                for gi, systems in enumerate(groups):
                    names = list(systems)
                    for name in names[rep % 3:] + names[:rep % 3]:
                        child, op = systems[name]
                        r = child.call(op)
                        times[gi][name].append(r["seconds"])
                        answers[gi][name] = r["token_ids"]
                        if op == "tag":
                            tag_extra.append(r)
                if not tagging_only:
                    for side in (("ours", "ref") if rep % 2 == 0 else ("ref", "ours")):
                        pipe[side].append((ours if side == "ours" else ref).call("pipeline"))
            facts = {"ours": ours.call("facts"), "ref": ref.call("facts")}
        finally:
            for c in (ours, ref):
                if c is not None:
                    c.close()
    stop = {2, 0}
    tag_trim = {k: [_trim(a, stop) for a in v] for k, v in answers[-1].items()}
    tag_tokens = [len(a) + (len(a) < r["max_new_tokens"]) for a, r in zip(tag_trim["ours"], tag_requests)]
    best = min(tag_extra, key=lambda r: r["seconds"])
    tag = {"times": times[-1], "meta": {
        "songs": s.tag_songs, "song_seconds": list(s.tag_song_s), "requests": len(tag_requests),
        "chunks": sum(r["chunks"] for r in tag_requests[::4]), "generated_tokens": sum(tag_tokens),
        "answer_caps": [r["max_new_tokens"] for r in tag_requests],
        "split": {k: v for k, v in best["split_s"].items()}, "ours_stats": best["stats"],
        "ours_first_run_s": facts["ours"]["tagging_first_run_s"],
        "agree_with_chat": {k: sum(a == b for a, b in zip(tag_trim[k], tag_trim["ref_chat"]))
                            for k in ("ours", "ref_batched")}}}
    if tagging_only:
        return {"tagging": tag}
    times, answers = times[0], answers[0]
    trimmed = {k: [_trim(a, stop) for a in v] for k, v in answers.items()}
    new_tokens = [len(a) + (len(a) < r["max_new_tokens"]) for a, r in zip(trimmed["ours"], requests)]  # + stop
    flops = sum(infer_flops(cfg, r["chunks"], r["prompt_tokens"], n) for r, n in zip(requests, new_tokens))
    n = len(requests)
    return {
        "tagging": tag,
        "infer": {k: {"answers_per_s": [n / t for t in v], "seconds": v, "achieved_flops_per_s": [flops / t for t in v]}
                  for k, v in times.items()},
        "infer_meta": {"requests": n, "chunks": [r["chunks"] for r in requests],
                       "prompt_tokens": [r["prompt_tokens"] for r in requests],
                       "answer_caps": [r["max_new_tokens"] for r in requests], "generated_tokens": sum(new_tokens),
                       "useful_flops": flops, "engine_batch": s.engine_batch,
                       "agree_with_chat": {k: sum(a == b for a, b in zip(trimmed[k], trimmed["ref_chat"]))
                                           for k in ("ours", "ref_batched")},
                       "ours_first_run_s": facts["ours"]["first_run_s"], "ours_compiles": facts["ours"]["compiles"],
                       "buckets": facts["ours"]["buckets"]},
        "pipeline": {k: {"chunks_per_s": [c / (a + b) for c, a, b in v],
                         "decode_resample_chunks_per_s": [c / a for c, a, b in v],
                         "mel_chunks_per_s": [c / b for c, a, b in v]} for k, v in pipe.items()},
    }


def run_profile(s: Settings, repeats: int, timeout: float) -> dict:
    ours, ref = Child("ours_prof", s, "", timeout), None
    try:
        ref = Child("ref_prof", s, "", timeout)
        res = {"ours": [], "ref": []}
        for rep in range(repeats):
            for side in (("ours", "ref") if rep % 2 == 0 else ("ref", "ours")):
                res[side].append((ours if side == "ours" else ref).call("run"))
    finally:
        for c in (ours, ref):
            if c is not None:
                c.close()
    flops = component_flops(model_config(s))
    out = []
    for k in flops:
        o, r = [x[k]["wall"] for x in res["ours"]], [x[k]["wall"] for x in res["ref"]]
        oc, rc = [x[k]["cpu"] for x in res["ours"]], [x[k]["cpu"] for x in res["ref"]]
        out.append({"component": k, "flops": flops[k], "ours_s": stats(o), "ref_s": stats(r),
                    "ours_cpu_s": stats(oc), "ref_cpu_s": stats(rc),
                    "speedup": statistics.median(r) / statistics.median(o)})
    return {"chunks": PROF_CHUNKS, "tokens": PROF_TOKENS, "components": out}


def stats(values) -> dict:
    v = [float(x) for x in values]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}


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


def row(name, metric, ours, ref, *, higher_is_better=True, target=None):
    o, r = stats(ours), stats(ref)
    ratio = o["median"] / r["median"] if r["median"] else float("nan")
    d = {"row": name, "metric": metric, "ours": o, "reference": r, "ratio": ratio,
         "higher_is_better": higher_is_better}
    if target is not None:
        d["target"] = target
        d["target_met"] = bool(ratio >= target)
    return d


def build_rows(s: Settings, train: dict, inf: dict, peak_tflops: float | None) -> list[dict]:
    rows = []
    unit, scale = ("TFLOP/s", 1e12) if s.device == "gpu" else ("GFLOP/s", 1e9)
    for key, label, target in (("train_full", "training, full", 1.5),
                               ("train_warmup", "training, warmup recipe", None)):
        g = lambda side, field: [r[key][field] for r in train[side]]
        rows.append(row(label, "samples/s", g("ours", "samples_per_s"), g("ref", "samples_per_s"), target=target))
        rows.append(row(label, "label tokens/s", g("ours", "label_tokens_per_s"), g("ref", "label_tokens_per_s")))
        rows.append(row(label, "process CPU s per sample",
                        [r[key]["cpu_s"] / r[key]["samples"] for r in train["ours"]],
                        [r[key]["cpu_s"] / r[key]["samples"] for r in train["ref"]], higher_is_better=False))
        rows.append(row(label, f"achieved {unit}", [x / scale for x in g("ours", "achieved_flops_per_s")],
                        [x / scale for x in g("ref", "achieved_flops_per_s")]))
        rows.append(row(label, "useful / computed FLOPs (padding)",
                        [r[key]["useful_flops"] / r[key]["computed_flops"] for r in train["ours"]],
                        [r[key]["useful_flops"] / r[key]["computed_flops"] for r in train["ref"]]))
        if peak_tflops:
            rows.append(row(label, "MFU", [x / (peak_tflops * 1e12) for x in g("ours", "achieved_flops_per_s")],
                            [x / (peak_tflops * 1e12) for x in g("ref", "achieved_flops_per_s")]))
        rows.append({"row": label, "metric": "compile s (ours only)", "ours": stats(g("ours", "compile_s")),
                     "reference": None, "ratio": None})
    rows += inference_rows(s, inf)
    rows.append(row("peak RSS, full training", "MB", [r["peak_rss_mb"] for r in train["ours"]],
                    [r["peak_rss_mb"] for r in train["ref"]], higher_is_better=False))
    if all("peak_device_mem_mb" in r for r in train["ours"] + train["ref"]):
        rows.append(row("peak device memory, full training", "MB", [r["peak_device_mem_mb"] for r in train["ours"]],
                        [r["peak_device_mem_mb"] for r in train["ref"]], higher_is_better=False))
    return rows + pipeline_rows(inf)


def inference_rows(s: Settings, inf: dict) -> list[dict]:
    """The 16-request rows (issue target: no inference row below 1.0x) and the tagging rows."""
    import tagging

    unit, scale = ("TFLOP/s", 1e12) if s.device == "gpu" else ("GFLOP/s", 1e9)
    i = inf["infer"]
    name = f"inference, {inf['infer_meta']['requests']} requests"
    rows = [row(name, "answers/s vs chat() loop", i["ours"]["answers_per_s"], i["ref_chat"]["answers_per_s"],
                target=1.0),
            row(name, "answers/s vs HF batched generate", i["ours"]["answers_per_s"],
                i["ref_batched"]["answers_per_s"], target=1.0),
            row(name, f"achieved {unit} vs chat() loop", [x / scale for x in i["ours"]["achieved_flops_per_s"]],
                [x / scale for x in i["ref_chat"]["achieved_flops_per_s"]])]
    return rows + tagging.rows(inf["tagging"], row, stats)[0]


def pipeline_rows(inf: dict) -> list[dict]:
    p = inf["pipeline"]
    return [row("input pipeline: decode + resample + log-mel", "chunks/s", p["ours"]["chunks_per_s"],
                p["ref"]["chunks_per_s"]),
            row("input pipeline: log-mel only (device vs WhisperFeatureExtractor)", "chunks/s",
                p["ours"]["mel_chunks_per_s"], p["ref"]["mel_chunks_per_s"])]


def fmt(x) -> str:
    if x is None:
        return ""
    a = abs(x)
    return f"{x:.3g}" if a < 10 else f"{x:.1f}" if a < 1000 else f"{x:,.0f}"


def profile_markdown(prof: dict, s: Settings) -> str:
    unit, scale = ("TFLOP/s", 1e12) if s.device == "gpu" else ("GFLOP/s", 1e9)
    lines = [f"| component ({prof['chunks']} chunks / {prof['tokens']} tokens) | ours s (CPU s) | reference s (CPU s) "
             f"| ours {unit} | reference {unit} | ours faster by |", "|---|---|---|---|---|---|"]
    for c in prof["components"]:
        o, r = c["ours_s"]["median"], c["ref_s"]["median"]
        lines.append(f"| {c['component']} | {o:.3f} ({c['ours_cpu_s']['median']:.2f}) | {r:.3f} "
                     f"({c['ref_cpu_s']['median']:.2f}) | {c['flops'] / o / scale:.1f} | {c['flops'] / r / scale:.1f} "
                     f"| {c['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def markdown(res: dict) -> str:
    m, s = res["machine"], res["settings"]
    lines = [f"# MuFun: JAX vs PyTorch reference ({res['mode']}, {res['device']})", "",
             f"Generated by `{res['command']}` on {res['date']}. Median over {res['repeats']} rounds, min-max in "
             f"brackets; ratio = ours / reference (medians). Load average (1 min) {m['loadavg_start'][0]:.2f} at "
             f"the start, {m['loadavg_end'][0]:.2f} at the end: numbers from a busy machine are not comparable"
             + (" (and with --parallel the phases shared the cores: smoke test only)." if res.get("parallel")
                else "."), "",
             "| row | metric | ours | reference | ratio | target |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        cell = lambda st: f"{fmt(st['median'])} [{fmt(st['min'])}-{fmt(st['max'])}]" if st else "-"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x" + ("" if r.get("higher_is_better", True)
                                                                        else " (lower is better)")
        tgt = "" if "target" not in r else f">= {r['target']}x: {'met' if r['target_met'] else '**missed**'}"
        lines.append(f"| {r['row']} | {r['metric']} | {cell(r['ours'])} | {cell(r['reference'])} | {ratio} | {tgt} |")
    inf = res["infer_meta"]
    lines += ["", "## Setup", "",
              f"- model: Whisper {s['whisper']}, taps {s['taps']}, `{s['connector_type']}`; Qwen3 {s['qwen3']}",
              f"- data: {s['train_samples']} timed training samples (+{s['warm_samples']} warm-up), clips "
              f"{s['clip_s'][0]:g}-{s['clip_s'][1]:g} s, prompts {s['prompt_tokens'][0]}-{s['prompt_tokens'][1]} "
              f"tokens, answers {s['answer_tokens'][0]}-{s['answer_tokens'][1]} tokens",
              f"- ours: packing rows x seq_len x max_chunks = {res['packing']}, remat `{s['remat']}`, "
              f"{'bf16' if s['device'] == 'gpu' else 'fp32'} compute, AdamW + clipping",
              f"- reference: batches of {s['ref_batch']} right-padded samples, {s['ref_accum']} per optimizer step, "
              f"sdpa attention, fused AdamW + clipping{', bf16 autocast' if s['device'] == 'gpu' else ', fp32'}",
              f"- inference: {inf['requests']} requests, {sum(inf['chunks'])} chunks, {inf['generated_tokens']} "
              f"generated tokens (per-request caps); engine batch {inf['engine_batch']}, length buckets every 256; "
              f"first run with compiles {inf['ours_first_run_s']:.1f} s; answers equal to the chat() loop's: ours "
              f"{inf['agree_with_chat']['ours']}/{inf['requests']}, HF batched "
              f"{inf['agree_with_chat']['ref_batched']}/{inf['requests']}",
              "",
              "Achieved FLOP/s counts useful FLOPs only (no padding, no recompute; the LM head over every "
              "position, as both sides compute it); \"useful / computed\" is the share of the computed FLOPs "
              "(padding included, remat recompute not) that is useful.", ""]
    if res.get("inference_tagging"):
        import tagging

        lines += tagging.markdown(res["inference_tagging"])
        tm = res.get("tagging_machine")
        if tm:
            what = "inference and input pipeline" if res.get("inference_machine") else "tagging"
            lines.append(f"- the {what} rows were measured separately (`{res.get('tagging_command')}`, "
                         f"{res['inference_tagging'].get('date')}) on {tm['cpu_model']}, {tm['cpu_count']} cores, "
                         f"load {tm['loadavg_start'][0]:.2f} at the start; the other rows on the machine below")
        lines.append("")
    if res.get("profile"):
        lines += ["## Components (--profile)", "", profile_markdown(res["profile"], Settings.from_dict(s))]
    lines += ["## Machine", ""]
    for k, v in {**m, **res["facts"]}.items():
        if k == "torch_parallel_info":
            v = "; ".join(x.strip() for x in v if x.strip())
        lines.append(f"- {k}: {v}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a fast smoke-test configuration")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each side runs once per round")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of the device, for MFU")
    ap.add_argument("--out", default=str(ROOT / "bench"), help="folder for results.json and results.md")
    ap.add_argument("--remat", default=None, help="our remat policy (default: dots_no_batch; tiny: none)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child process answer")
    ap.add_argument("--profile", action="store_true",
                    help="also time the model's pieces (encoder, LLM layers, LM head + loss) on each side")
    ap.add_argument("--only-profile", action="store_true", help="run only the --profile part and print it")
    ap.add_argument("--only-inference", action="store_true", help="run only the inference rows (16 requests, "
                    "tagging, input pipeline) and update them in an existing results.json")
    ap.add_argument("--only-tagging", action="store_true", help="run only the tagging workload and update its rows "
                    "and inference_tagging in OUT/results.{json,md}")
    ap.add_argument("--parallel", action="store_true",
                    help="smoke tests only: run the training and the inference phases at the same time "
                         "(the timings are then not comparable)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        spec = json.loads(args.child)
        s = Settings.from_dict(spec["settings"])
        if s.device == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
        serve(spec["task"], s, spec["workdir"])
        return 0

    s = tiny_settings() if args.tiny else full_settings()
    s.device = args.device
    if args.device == "gpu" and not args.tiny:  # bf16 and device memory: larger packed batches pay off
        s.pack_grid = [(r, t, c) for t in (2048, 3072, 4096) for r in (2, 4, 8, 16) for c in (8, 16, 24, 32)
                       if r * t <= 32768]
    if args.remat:
        s.remat = args.remat
    facts = machine_facts()
    print(f"compare: {'tiny' if args.tiny else 'full'} settings on {args.device}, {args.repeats} rounds; "
          f"{facts['cpu_count']} cores, load {facts['loadavg_start']}", file=sys.stderr, flush=True)
    if args.only_profile:
        print(profile_markdown(run_profile(s, 1, args.timeout), s))  # each piece: best of 3 calls
        return 0
    if args.only_tagging or args.only_inference:
        return _update_inference(s, args, facts)
    if args.parallel:
        from concurrent.futures import ThreadPoolExecutor

        CHILD_ENV.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # two children share the cores
        with ThreadPoolExecutor(2) as pool:
            f_train = pool.submit(run_training, s, args.repeats, args.timeout)
            f_inf = pool.submit(run_inference, s, args.repeats, args.timeout)
            train, inf = f_train.result(), f_inf.result()
    else:
        train = run_training(s, args.repeats, args.timeout)
        inf = run_inference(s, args.repeats, args.timeout)
    prof = run_profile(s, 1, args.timeout) if args.profile else None  # each piece: best of 3 calls
    facts["loadavg_end"] = list(os.getloadavg())
    res = {"mode": "tiny" if args.tiny else "full", "device": args.device, "repeats": args.repeats,
           "parallel": args.parallel,
           "command": " ".join(["python bench/compare.py"] + list(sys.argv[1:] if argv is None else argv)),
           "date": time.strftime("%Y-%m-%d %H:%M"), "machine": facts,
           "facts": {**train["ref"][0]["facts"], **train["ours"][0]["facts"]},
           "settings": dataclasses.asdict(s), "packing": train["ours"][0]["train_full"]["packing"],
           "rows": build_rows(s, train, inf, args.peak_tflops), "infer_meta": inf["infer_meta"], "profile": prof,
           "inference_tagging": _tagging_summary(inf["tagging"]),
           "raw": {"ours_train": train["ours"], "ref_train": train["ref"], "infer": inf}}
    _write(res, Path(args.out))
    return 0


def _tagging_summary(tag: dict) -> dict:
    import tagging

    return {**tagging.rows(tag, row, stats)[1], "date": time.strftime("%Y-%m-%d %H:%M")}


def _write(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(res)
    for name, text in (("results.json", json.dumps(res, indent=1)), ("results.md", md)):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)  # a reader never sees half a table
    print(md)


def _update_inference(s: Settings, args, facts: dict) -> int:
    """--only-tagging / --only-inference: measure the tagging workload (or every inference row:
    16 requests, tagging, input pipeline) and replace those rows in an existing results.json."""
    import tagging

    out = Path(args.out)
    old = out / "results.json"
    flag = "--only-tagging" if args.only_tagging else "--only-inference"
    if not old.exists():
        print(f"compare: {flag} updates {old}, which does not exist: run the whole comparison first",
              file=sys.stderr)
        return 2
    res = json.loads(old.read_text())
    inf = run_inference(s, args.repeats, args.timeout, tagging_only=args.only_tagging)
    if args.only_tagging:
        new_rows, replaced = tagging.rows(inf["tagging"], row, stats)[0], ("tagging:",)
    else:
        new_rows, replaced = inference_rows(s, inf) + pipeline_rows(inf), ("tagging:", "inference,", "input pipeline")
        res["infer_meta"] = inf["infer_meta"]
    names = {r["row"] for r in new_rows}
    kept = [r for r in res["rows"] if r["row"] not in names and not r["row"].startswith(replaced)]
    at = next((i for i, r in enumerate(kept) if r["row"].startswith("peak RSS")), len(kept))
    res["rows"] = kept[:at] + new_rows + kept[at:]
    res["inference_tagging"] = _tagging_summary(inf["tagging"])
    res.setdefault("raw", {})["tagging" if args.only_tagging else "infer"] = (
        inf["tagging"] if args.only_tagging else inf)
    command = " ".join(["python bench/compare.py"] + sys.argv[1:])
    # these rows may come from another machine than the rest of the table: say which
    machine = {**facts, "loadavg_end": list(os.getloadavg())}
    res["tagging_command"], res["tagging_machine"] = command, machine
    if not args.only_tagging:
        res["inference_command"], res["inference_machine"] = command, machine
    _write(res, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
