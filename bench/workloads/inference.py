"""The inference workload of bench/compare.py: 16 requests (one clip each, per-request answer caps,
greedy) answered by ``mufun_jax.MuFun.generate`` against the reference ``chat()`` loop (one at a
time, HF ``generate``) and against one HF batched ``generate`` (left-padded).

Each side has one long-lived child (ours compiles once) that also serves the tagging workload
(:mod:`.tagging`) and the input pipeline (:mod:`.pipeline`); the reference's child writes the
shared inputs first (weights, tokenizer, clips, requests). The parent alternates the systems round
by round and compares the greedy answers with the chat() loop's."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import pipeline, tagging
from .children import Child
from .rows import row
from .settings import PROMPTS, Settings, build_reference, jax_facts, log, model_config, run_settings, torch_dtype, \
    torch_facts
from .synthetic import infer_flops, synth_wave


def make_reference_engine(ref, tok, stop_ids, device: str):
    """``bench/inference.py``'s ``Reference`` (the reference ``chat()`` recipe: load, WhisperFeatureExtractor,
    template, splice, HF ``generate``), returning token ids, with a per-request answer cap and device
    placement."""
    from inference import Reference  # bench/inference.py, the standalone inference benchmark

    class RefEngine(Reference):
        def __init__(self):
            super().__init__(ref, tok, stop_ids, 1)
            self.dev = "cuda" if device == "gpu" else "cpu"

        def inputs(self, req):
            import torch

            if self.dev == "cpu" and next(self.ref.parameters()).dtype == torch.float32:
                return super().inputs(req)
            return self.device_inputs(req)  # on the GPU, or bf16 modules (the features cast to bf16)

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


def _request_fields(r: dict) -> dict:
    return {k: v for k, v in r.items() if k in ("id", "prompt", "audio", "max_new_tokens")}


def ref_child(s: Settings, workdir: str):
    """The reference side; it also writes the shared inputs (weights, tokenizer, clips) to ``workdir``."""
    import soundfile as sf
    import torch

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
    ref = ref.to("cuda" if s.device == "gpu" else "cpu").to(torch_dtype(s))  # bf16 modules at bf16
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
    pipeline.write_music(s, wd, rng)
    tagging.make_requests(s, wd, rng, tok, cfg, synth_wave)
    reference = make_reference_engine(ref, tok, stop_ids, s.device)
    reqs = [_request_fields(r) for r in requests]
    if s.device == "cpu" and s.precision == "fp32":  # the device-aware splice (GPU, bf16) equals Reference.inputs
        with torch.no_grad():
            a, b = reference.inputs(reqs[0]), reference.device_inputs(reqs[0])
        assert a.shape == b.shape and float((a - b).abs().max()) < 1e-5, "device_inputs != Reference.inputs"
    reference.chat_ids(dict(reqs[0], max_new_tokens=2))  # warm-up (allocator, thread pool)
    reference.batched_ids([dict(r, max_new_tokens=2) for r in reqs[:2]])
    pipe_ops = pipeline.ref_ops(cfg, wd)
    log("ref infer: ready")

    def timed(fn):
        t0 = time.perf_counter()
        ids = fn()
        return {"seconds": time.perf_counter() - t0, "token_ids": ids}

    return {
        "facts": torch_facts,
        "chat": lambda: timed(lambda: [reference.chat_ids(r) for r in reqs]),
        "batched": lambda: timed(lambda: reference.batched_ids(reqs)),
        **pipe_ops,
        **tagging.ref_ops(reference, wd, s.engine_batch),
    }


def ours_child(s: Settings, workdir: str):
    from flax import nnx

    import mufun_jax
    from mufun_jax.convert import load_params, torch_to_flax
    from mufun_jax.data.dataset import dataset_tokenizer
    from mufun_jax.models import MuFun

    wd = Path(workdir)
    cfg = model_config(s)
    run = run_settings(s).replace(remat_policy="none")
    if s.precision == "bf16":  # inference holds bf16 weights, as the reference's bf16 modules do
        run = run.replace(param_dtype="bfloat16")
    model = MuFun(cfg, run, rngs=nnx.Rngs(0))
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
    pipe_ops = pipeline.ours_ops(cfg, wd)
    tag_ops, tag_first = tagging.ours_op(model, tok, wd, s, buckets)
    log(f"ours infer: ready (first run, compiles included: {first:.1f} s; tagging {tag_first:.1f} s)")

    def infer():
        t0 = time.perf_counter()
        res = engine.generate(reqs, return_details=True)
        return {"seconds": time.perf_counter() - t0, "token_ids": [r.token_ids for r in res]}

    def profiled():
        """One more pass with the phases timed (each waits for the device) from empty caches:
        encode / prefill / decode seconds and the audio and prefix cache hit rates of the run."""
        gen = engine.generator
        gen.clear_caches()
        gen.stats.clear()
        gen.timings.clear()
        gen.profile = True
        try:
            engine.generate(reqs, return_details=True)
        finally:
            gen.profile = False
        cs = gen.cache_stats()
        return {**{f"{k}_s": v for k, v in gen.timings.items()}, "stats": dict(gen.stats),
                "cache": {k: {"reused": v["reused"], "used": v["used"]} for k, v in cs.items()},
                "encoder_chunks": gen.stats["encoder_chunks"], "encoder_padding": gen.stats["encoder_padding"]}

    return {
        "facts": lambda: {**jax_facts(), "first_run_s": first, "compiles": dict(engine.generator.compiles),
                          "buckets": list(buckets), "tagging_first_run_s": tag_first, "profile": profiled()},
        "infer": infer,
        **pipe_ops,
        **tag_ops,
    }


# -- the parent -----------------------------------------------------------------------------------


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
                       "ours_profile": facts["ours"]["profile"],
                       "buckets": facts["ours"]["buckets"]},
        "pipeline": pipeline.results(pipe),
    }


def rows(s: Settings, inf: dict) -> list[dict]:
    """The 16-request rows (issue target: no inference row below 1.0x) and the tagging rows."""
    unit, scale = ("TFLOP/s", 1e12) if s.device == "gpu" else ("GFLOP/s", 1e9)
    i = inf["infer"]
    name = f"inference, {inf['infer_meta']['requests']} requests"
    rows = [row(name, "answers/s vs chat() loop", i["ours"]["answers_per_s"], i["ref_chat"]["answers_per_s"],
                target=1.0),
            row(name, "answers/s vs HF batched generate", i["ours"]["answers_per_s"],
                i["ref_batched"]["answers_per_s"], target=1.0),
            row(name, f"achieved {unit} vs chat() loop", [x / scale for x in i["ours"]["achieved_flops_per_s"]],
                [x / scale for x in i["ref_chat"]["achieved_flops_per_s"]])]
    return rows + tagging.rows(inf["tagging"])[0]
