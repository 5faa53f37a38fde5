#!/usr/bin/env python3
"""``mufun-tag`` against the reference's way of tagging a library, side by side in one run.

A library of ``--songs`` synthetic songs of ``--min-s``..``--max-s`` seconds is tagged with the
``tags`` preset (7 short questions per song, greedy, ``--max-new-tokens`` each):

- ours: :func:`mufun_jax.tagging.tag_library` writing JSONL (the engine: each song decoded, encoded
  and its prompt prefix prefilled once for its 7 questions, continuous batching across songs);
  a first run compiles, then the output is removed and the caches emptied, and the timed run tags
  the whole library again;
- the reference: one ``chat()`` per question per song (bench/inference.py's ``Reference``: load,
  WhisperFeatureExtractor, template, splice, HF ``generate`` on the torch model), so each song is
  decoded and encoded 7 times; one warm-up chat first.

The model is bench/compare.py's bench config (bench/workloads/settings.py; ``full``: a 4-layer
384-wide Whisper, a 4-layer 512-wide Qwen3 with a 32k vocabulary; random weights, the same in
torch and JAX; ``tiny`` for a smoke run). Both sides do the whole job from the audio files.
Reported: songs/hour, answers/s and how many greedy answers agree.

Usage: python bench/tag_bench.py [--songs 24] [--min-s 10] [--max-s 240] [--max-new-tokens 16]
       [--settings full|tiny] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--songs", type=int, default=24)
    ap.add_argument("--min-s", type=float, default=10.0)
    ap.add_argument("--max-s", type=float, default=240.0)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--settings", choices=("full", "tiny"), default="full")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)

    import jax
    import soundfile as sf
    import torch
    from flax import nnx

    import mufun_jax
    from inference import Reference
    from mufun_jax.convert import load_params, torch_to_flax
    from mufun_jax.data.dataset import dataset_tokenizer
    from mufun_jax.data.tokenizer import build_tokenizer
    from mufun_jax.models import MuFun
    from mufun_jax.tag_answers import PRESETS
    from mufun_jax.tag_formats import read_table
    from mufun_jax.tagging import tag_library
    from workloads.settings import build_reference, full_settings, model_config, run_settings, tiny_settings
    from workloads.synthetic import synth_wave

    jax.config.update("jax_default_matmul_precision", "highest")
    s = full_settings() if args.settings == "full" else tiny_settings()
    cfg = model_config(s)
    preset = PRESETS["tags"]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(tmp)
        words = "genre jazz rock piano guitar drums tempo fast slow bright dark happy sad loud quiet song".split()
        build_tokenizer([" ".join(rng.choice(words, 6)) for _ in range(200)] + list(preset.questions.values()),
                        wd / "tok", vocab_size=512)
        tok = dataset_tokenizer(wd / "tok")
        ref = build_reference(cfg, seed=3)
        with torch.no_grad():
            ref.language_model.lm_head.weight.mul_(4.0)  # decisive argmaxes, so both sides pick the same tokens
        model = MuFun(cfg, run_settings(s).replace(remat_policy="none"), rngs=nnx.Rngs(0))
        load_params(model, torch_to_flax(ref.combined_state_dict(), cfg))
        lib = wd / "lib"
        secs = []
        for i in range(args.songs):
            secs.append(float(rng.uniform(args.min_s, args.max_s)))
            (lib / f"album{i % 4}").mkdir(parents=True, exist_ok=True)
            sf.write(lib / f"album{i % 4}" / f"song{i:02d}.wav", synth_wave(rng, secs[-1]), 16000,
                     subtype="FLOAT")
        limit = cfg.tokenizer_model_max_length
        engine = mufun_jax.MuFun(model, tok, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                 buckets=tuple(range(256, limit, 256)) + (limit,))
        out = wd / "tags.jsonl"

        def ours():
            engine.generator.clear_caches()
            if out.exists():
                out.unlink()
            return tag_library(engine, lib, preset, "jsonl", out, max_new_tokens=args.max_new_tokens,
                               progress=False)

        first = ours()  # compiles every program the library needs
        stats0 = dict(engine.generator.stats)
        summary = ours()
        stats = {k: engine.generator.stats[k] - stats0.get(k, 0) for k in ("audio_encoded", "prefix_computed",
                                                                               "prefix_reused")}
        records = read_table("jsonl", out)
        # A song whose answers give no tag (a random model's empty answers) is a counted failure with
        # its raw answers kept: its questions were answered all the same, so they count here too.
        answered = {rel: {"path": rel, **rec} for rel, rec in records.items()}
        answered.update({f["path"]: f["raw"] for f in summary.failures if f["raw"]})

        reference = Reference(ref, tok, engine.stop_ids, args.max_new_tokens)
        songs = sorted(answered)
        reference.chat({"prompt": "What genre is this?", "audio": str(lib / songs[0])})  # warm-up
        t0 = time.perf_counter()
        ref_answers = {(rel, name): reference.chat({"prompt": q, "audio": str(lib / rel)})
                       for rel in songs for name, q in preset.questions.items()}
        ref_s = time.perf_counter() - t0
        if os.environ.get("TAG_BENCH_KEEP"):
            shutil.copy(out, os.environ["TAG_BENCH_KEEP"])

    q = len(preset.questions)
    agree = sum(answered[rel][name] == a for (rel, name), a in ref_answers.items())
    n = len(songs)
    print(f"\n{args.settings} bench config; {n} songs of {min(secs):.0f}-{max(secs):.0f} s "
          f"({sum(secs) / 60:.1f} min of audio), tags preset ({q} questions, <= {args.max_new_tokens} new tokens, "
          f"greedy); batch size {args.batch_size}; torch threads {torch.get_num_threads()}, jax {jax.devices()}")
    print(f"ours: {n} songs answered ({summary.tagged} tagged, failed {summary.failed or 0}); first run (compiles) "
          f"{first.seconds:.1f} s; songs encoded {stats['audio_encoded']}, prefixes computed "
          f"{stats['prefix_computed']} and reused {stats['prefix_reused']}")
    print(f"greedy answers equal to the reference's: {agree}/{n * q}\n")
    print("| tag library | seconds | songs/hour | answers/s | vs reference |")
    print("|---|---|---|---|---|")
    for name, sec in (("mufun-tag (engine)", summary.seconds), ("reference, one chat() per question", ref_s)):
        print(f"| {name} | {sec:.1f} | {n / sec * 3600:.0f} | {n * q / sec:.2f} | {ref_s / sec:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
