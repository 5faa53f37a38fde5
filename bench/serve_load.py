#!/usr/bin/env python3
"""Load on ``mufun-serve``: a fixed set of requests from 1, 8 and 32 concurrent clients, beside the
same requests answered offline (``MuFun.iter_results``, the path infer.py runs), in one run.

The model is the inference bench's (``mufun-tiny`` with the 2-layer width-32 Whisper, random
weights, a small offline tokenizer); 4 songs x 8 questions = 32 requests, each answered with
exactly ``--max-tokens`` tokens (``ignore_eos``), so both sides do the same work. The server runs in
its own process (``python -m mufun_jax.serve.cli``) and is warmed up with two rounds per client
count first (its programs compile then); the offline side is warmed up the same way. Clients stream
(``stream: true``), so the time to the first token is measured; latency is the whole answer.

Usage: python bench/serve_load.py [--max-tokens 32] [--batch-size 8] [--out bench]
Prints a table and writes serve_load.json / serve_load.md next to the other results.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402

QUESTIONS = ["What genre is this?", "Describe the rhythm.", "Which instruments play?", "Is the tempo fast or slow?",
             "What mood is it?", "Is there singing?", "How loud is it?", "What key is it in?"]
WORDS = "genre jazz rock piano guitar drums tempo fast slow bright dark happy sad loud quiet song".split()


def build(d: Path, sets: int) -> tuple[Path, list[list[Path]]]:
    import soundfile as sf
    from flax import nnx

    from mufun_jax.checkpoint import save_model
    from mufun_jax.config import WhisperConfig, preset
    from mufun_jax.data.tokenizer import build_tokenizer
    from mufun_jax.models import MuFun

    rng = np.random.default_rng(0)
    tok = build_tokenizer([" ".join(rng.choice(WORDS, 6)) for _ in range(200)] + QUESTIONS, d / "tok", vocab_size=512)
    base = preset("mufun-tiny")
    cfg = base.replace(whisper=WhisperConfig(num_mel_bins=128, d_model=32, encoder_layers=2,
                                             encoder_attention_heads=2, encoder_ffn_dim=64),
                       taps=(0, 1, 2), connector_type="blp_3i_2x",
                       qwen3=dataclasses.replace(base.qwen3, vocab_size=len(tok)))
    save_model(d / "model", cfg, nnx.to_pure_dict(nnx.state(MuFun(cfg, rngs=nnx.Rngs(0)))), tokenizer=tok)
    songs = []  # a fresh set of 4 songs for every round: no round finds another's audio in the caches
    for k in range(sets):
        songs.append([])
        for s in range(4):
            t = np.arange(int((3 + 4 * s) * 16000)) / 16000
            x = 0.3 * np.sin(2 * np.pi * 110 * (s + 1) * t) + 0.05 * rng.standard_normal(t.size)
            songs[-1].append(d / f"song{k}_{s}.wav")
            sf.write(songs[-1][-1], x.astype(np.float32), 16000)
    return d / "model", songs


def offline(model: Path, warm: list[Path], songs: list[Path], args) -> dict:
    from mufun_jax import MuFun

    m = MuFun.from_pretrained(model, batch_size=args.batch_size, max_new_tokens=args.max_tokens,
                              decode_steps=args.decode_steps)
    reqs = [{"prompt": q, "audio": str(s)} for s in songs for q in QUESTIONS]
    kw = dict(max_new_tokens=args.max_tokens, eos_token_id=None)
    list(m.iter_results([{"prompt": q, "audio": str(s)} for s in warm for q in QUESTIONS], **kw))  # compiles
    t0 = time.perf_counter()
    out = list(m.iter_results(reqs, **kw))
    wall = time.perf_counter() - t0
    assert all(r.error is None and len(r.token_ids) == args.max_tokens for r in out)
    return {"answers_per_s": len(reqs) / wall, "seconds": wall, "requests": len(reqs)}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served(model: Path, sets: list[list[Path]], args) -> dict:
    import httpx

    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "mufun_jax.serve.cli", str(model), "--port", str(port),
                             "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_tokens),
                             "--decode-steps", str(args.decode_steps), "--max-queue", "256"],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        def bodies_of(songs):  # encoded before the clock starts: a client's JSON work is not the server's
            audio = {s: base64.b64encode(s.read_bytes()).decode() for s in songs}
            return [json.dumps({"model": "model", "temperature": 0, "max_tokens": args.max_tokens, "ignore_eos": True,
                     "stream": True, "messages": [{"role": "user", "content": [
                         {"type": "text", "text": q},
                         {"type": "input_audio", "input_audio": {"data": audio[s], "format": "wav"}}]}]}).encode()
                    for s in songs for q in QUESTIONS]

        client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64))

        def one(body):
            t0 = time.perf_counter()
            first, n = None, 0
            with client.stream("POST", url + "/v1/chat/completions", content=body,
                               headers={"Content-Type": "application/json"}) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: {") and first is None and '"content":"' in line.replace(" ", "") \
                            and '"content":""' not in line.replace(" ", ""):
                        first = time.perf_counter() - t0
                    n += line.startswith("data: [DONE]")
            assert n == 1
            return time.perf_counter() - t0, first if first is not None else time.perf_counter() - t0

        def round_(clients, songs):
            bodies = bodies_of(songs)
            with ThreadPoolExecutor(clients) as pool:
                t0 = time.perf_counter()
                res = list(pool.map(one, bodies))
                wall = time.perf_counter() - t0
            lat, ttft = np.array([r[0] for r in res]), np.array([r[1] for r in res])
            return {"clients": clients, "answers_per_s": len(bodies) / wall, "seconds": wall,
                    "p50_latency_s": float(np.percentile(lat, 50)), "p99_latency_s": float(np.percentile(lat, 99)),
                    "p50_ttft_s": float(np.percentile(ttft, 50)), "p99_ttft_s": float(np.percentile(ttft, 99))}

        n = len(args.clients)
        # warm-up, twice per client count on fresh songs: compiles every program (admission batch,
        # bucket and span shapes) the measured rounds will meet, so they measure the steady state
        for c, songs in zip(args.clients * 2, sets[:2 * n]):
            round_(c, songs)
        return {"rounds": [round_(c, songs) for c, songs in zip(args.clients, sets[2 * n:])]}
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--out", default=None, help="write serve_load.json and serve_load.md here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        n = len(args.clients)
        model, sets = build(Path(tmp), 3 * n + 2)
        off = offline(model, sets[-2], sets[-1], args)
        srv = served(model, sets[:3 * n], args)
    import platform

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    rows = ["| clients | answers/s | vs offline | p50 latency (s) | p99 latency (s) | p50 TTFT (s) | p99 TTFT (s) |",
            "|---|---|---|---|---|---|---|"]
    rows += [f"| {r['clients']} | {r['answers_per_s']:.2f} | {r['answers_per_s'] / off['answers_per_s']:.2f}x | "
             f"{r['p50_latency_s']:.2f} | {r['p99_latency_s']:.2f} | {r['p50_ttft_s']:.2f} | {r['p99_ttft_s']:.2f} |"
             for r in srv["rounds"]]
    rows.append(f"| offline (MuFun.iter_results) | {off['answers_per_s']:.2f} | 1.00x | | | | |")
    head = (f"{off['requests']} requests ({len(QUESTIONS)} questions x 4 songs), {args.max_tokens} tokens each, "
            f"batch {args.batch_size}, decode steps {args.decode_steps}; {machine}")
    print(head + "\n" + "\n".join(rows))
    if args.out:
        out = Path(args.out)
        (out / "serve_load.json").write_text(json.dumps({"machine": machine, "settings": vars(args), "offline": off,
                                                         **srv}, indent=1))
        (out / "serve_load.md").write_text(f"# mufun-serve under load\n\n{head}\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
