"""The tagging workload of ``bench/compare.py``: what people run MuFun for at scale.

Songs of 10-240 s, four questions each, greedy: three short answers (genre, mood, instruments: caps
of 5-30 tokens) and one long one (lyrics: a cap of 100-400 tokens). Three systems answer the same
requests in input order (a song's questions next to each other, as a tagging script sends them):

- ours: ``mufun_jax.MuFun.generate``: continuous batching, each song encoded once, each song's prompt
  prefix prefilled once, its caches emptied before every timed run (compiles are warmed up);
- the reference ``chat()`` loop: one request at a time, decoding and encoding the song again for
  every question, as the reference does;
- HF batched ``generate``: the same requests in batches of ``engine_batch``, left-padded, each
  batch running to its longest cap.

Every system does the whole job from the audio files: decode, resample, log-mel, tokenise, encode,
generate. Greedy answers are compared with the chat() loop's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .rows import row, stats


SHORT = ["What genre is this?", "What is the mood of this song?", "Which instruments play?"]
LONG = "Transcribe the lyrics."


def make_requests(s, wd: Path, rng, tok, cfg, synth_wave) -> list[dict]:
    """Write the songs to ``wd`` and return the requests (with chunk and prompt-token counts)."""
    import soundfile as sf

    from mufun_jax import audio
    from mufun_jax.data.templates import get_template, tokenize_with_audio

    reqs = []
    for song in range(s.tag_songs):
        secs = float(rng.uniform(*s.tag_song_s))
        wave = synth_wave(rng, secs)
        path = wd / f"song{song}.wav"
        sf.write(path, wave, 16000, subtype="FLOAT")
        k = len(audio.chunk(wave))
        for q, prompt in enumerate(SHORT + [LONG]):
            lo, hi = s.tag_long if prompt == LONG else s.tag_short
            cap = int(rng.integers(lo, hi + 1))
            ids = tokenize_with_audio(get_template("qwen2_instruct").render([("<audio>\n" + prompt, None)]), tok)
            reqs.append({"id": f"s{song}q{q}", "prompt": prompt, "audio": str(path), "max_new_tokens": cap,
                         "song": song, "chunks": k, "prompt_tokens": len(ids) - 1 + cfg.tokens_per_chunk * k})
    (wd / "tagging.json").write_text(json.dumps(reqs))
    return reqs


def ref_ops(reference, wd: Path, batch: int) -> dict:
    reqs = [{k: r[k] for k in ("id", "prompt", "audio", "max_new_tokens")}
            for r in json.loads((wd / "tagging.json").read_text())]

    def timed(fn):
        t0 = time.perf_counter()
        ids = fn()
        return {"seconds": time.perf_counter() - t0, "token_ids": ids}

    return {"tag_chat": lambda: timed(lambda: [reference.chat_ids(r) for r in reqs]),
            "tag_batched": lambda: timed(lambda: [ids for i in range(0, len(reqs), batch)
                                                  for ids in reference.batched_ids(reqs[i:i + batch])])}


def ours_op(model, tok, wd: Path, s, buckets) -> tuple[dict, float]:
    """(ops, first-run seconds): a ``mufun_jax.MuFun`` sized for the workload, warmed up once."""
    import mufun_jax

    reqs = [{k: r[k] for k in ("id", "prompt", "audio", "max_new_tokens")}
            for r in json.loads((wd / "tagging.json").read_text())]
    cap = max(r["max_new_tokens"] for r in reqs)
    engine = mufun_jax.MuFun(model, tok, batch_size=s.engine_batch, max_new_tokens=cap, buckets=buckets,
                             decode_steps=16)
    gen = engine.generator
    t0 = time.perf_counter()
    engine.generate(reqs, return_details=True)  # warm-up: compiles every program these requests need
    first = time.perf_counter() - t0

    def run():
        gen.clear_caches()  # every timed run starts cold: each song is encoded once within it, not before
        gen.profile = True
        before, stats = dict(gen.timings), dict(gen.stats)
        t0 = time.perf_counter()
        res = engine.generate(reqs, return_details=True)
        seconds = time.perf_counter() - t0
        split = {k: gen.timings[k] - before.get(k, 0.0) for k in ("encode", "prefill", "decode")}
        split["host and other"] = seconds - sum(split.values())
        return {"seconds": seconds, "token_ids": [r.token_ids for r in res], "split_s": split,
                "stats": {k: v - stats.get(k, 0) for k, v in gen.stats.items()}}

    return {"tag": run}, first


def rows(res: dict) -> tuple[list[dict], dict]:
    """The result rows (answers/s and tokens/s, ours against each reference system) and the
    ``inference_tagging`` summary for results.json."""
    t, meta = res["times"], res["meta"]
    n, toks = meta["requests"], meta["generated_tokens"]
    name = f"tagging: {meta['songs']} songs x 4 questions"
    out = [row(name, "answers/s vs chat() loop", [n / x for x in t["ours"]], [n / x for x in t["ref_chat"]],
               target=5.0),
           row(name, "answers/s vs HF batched generate", [n / x for x in t["ours"]],
               [n / x for x in t["ref_batched"]], target=2.0),
           row(name, "generated tokens/s vs chat() loop", [toks / x for x in t["ours"]],
               [toks / x for x in t["ref_chat"]]),
           row(name, "generated tokens/s vs HF batched generate", [toks / x for x in t["ours"]],
               [toks / x for x in t["ref_batched"]])]
    med = lambda v: stats(v)["median"]
    summary = {
        "answers_per_s": {k: med([n / x for x in v]) for k, v in t.items()},
        "generated_tokens_per_s": {k: med([toks / x for x in v]) for k, v in t.items()},
        "ratio_vs_chat_loop": med(t["ref_chat"]) / med(t["ours"]),
        "ratio_vs_hf_batched": med(t["ref_batched"]) / med(t["ours"]),
        "time_split": meta["split"], **{k: v for k, v in meta.items() if k != "split"},
    }
    return out, summary


def markdown(summary: dict) -> list[str]:
    sp = summary["time_split"]
    total = sum(sp.values())
    share = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sp.items())
    return [f"- tagging workload: {summary['songs']} songs ({summary['song_seconds'][0]:.0f}-"
            f"{summary['song_seconds'][1]:.0f} s, {summary['chunks']} chunks), {summary['requests']} requests, "
            f"{summary['generated_tokens']} generated tokens; ours vs chat() loop "
            f"{summary['ratio_vs_chat_loop']:.2f}x, vs HF batched {summary['ratio_vs_hf_batched']:.2f}x; our time "
            f"split: {share}; songs encoded {summary['ours_stats'].get('audio_encoded', 0)} times, prefixes "
            f"computed {summary['ours_stats'].get('prefix_computed', 0)} and reused "
            f"{summary['ours_stats'].get('prefix_reused', 0)} times; answers equal to the chat() loop's: ours "
            f"{summary['agree_with_chat']['ours']}/{summary['requests']}, HF batched "
            f"{summary['agree_with_chat']['ref_batched']}/{summary['requests']}"]
