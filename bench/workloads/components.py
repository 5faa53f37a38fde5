"""The component profile of bench/compare.py (``--profile``): the same pieces of the model at the
same shapes, timed on each side (encoder forward, encoder forward+backward, LLM layers
forward+backward, LM head + loss forward+backward), which tells whether a gap between the sides
is in the kernels or in the work done (padding, recompute)."""

from __future__ import annotations

import statistics
import time

import numpy as np

from .children import Child
from .rows import stats
from .settings import Settings, build_reference, log, model_config, run_settings, torch_dtype

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


def ours_child(s: Settings, workdir: str):
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


def ref_child(s: Settings, workdir: str):
    import torch

    cfg = model_config(s)
    dt = torch_dtype(s)  # bf16 modules at bf16: the reference's own bf16 kernels, no autocast casts
    ref = build_reference(cfg, seed=0, device=s.device).to(dt)
    ref.train()
    dev = "cuda" if s.device == "gpu" else "cpu"
    g = torch.Generator().manual_seed(0)
    mel = (torch.rand(PROF_CHUNKS, cfg.whisper.num_mel_bins, cfg.whisper.num_frames, generator=g) * 2 - 1).to(dev, dt)
    emb = torch.randn(1, PROF_TOKENS, cfg.qwen3.hidden_size, generator=g).to(dev, dt).requires_grad_(True)
    h = torch.randn(PROF_TOKENS, cfg.qwen3.hidden_size, generator=g).to(dev, dt).requires_grad_(True)
    tgt = torch.randint(0, cfg.qwen3.vocab_size, (PROF_TOKENS,), generator=g).to(dev)
    enc, lm = ref.vision_tower._vision_tower, ref.language_model
    sync = torch.cuda.synchronize if s.device == "gpu" else (lambda: None)

    def enc_fwd():
        with torch.no_grad():
            out = enc(mel, output_hidden_states=True)
            sum(out.hidden_states[i].float().sum() for i in cfg.taps).item()

    def enc_train():
        out = enc(mel, output_hidden_states=True)
        loss = sum(out.hidden_states[i].float().sum() for i in cfg.taps)
        loss.backward()
        sync()

    def lm_train():
        loss = lm.model(inputs_embeds=emb).last_hidden_state.float().sum()
        loss.backward()
        sync()

    def head_train():
        loss = torch.nn.functional.cross_entropy(lm.lm_head(h).float(), tgt, reduction="sum")
        loss.backward()
        sync()

    fns = {"whisper forward": enc_fwd, "whisper forward+backward": enc_train,
           "qwen3 layers forward+backward": lm_train, "lm head + cross-entropy forward+backward": head_train}
    log("ref profile: built")
    return {"run": lambda: {k: _best_of(f) for k, f in fns.items()}}


# -- the parent -----------------------------------------------------------------------------------


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
        out.append({"component": k, "precision": s.precision, "flops": flops[k], "ours_s": stats(o), "ref_s": stats(r),
                    "ours_cpu_s": stats(oc), "ref_cpu_s": stats(rc),
                    "speedup": statistics.median(r) / statistics.median(o)})
    return {"chunks": PROF_CHUNKS, "tokens": PROF_TOKENS, "components": out}


def markdown(prof: dict, s: Settings) -> str:
    unit, scale = ("TFLOP/s", 1e12) if s.device == "gpu" else ("GFLOP/s", 1e9)
    lines = [f"| component ({prof['chunks']} chunks / {prof['tokens']} tokens) | precision | ours s (CPU s) "
             f"| reference s (CPU s) | ours {unit} | reference {unit} | ours faster by |",
             "|---|---|---|---|---|---|---|"]
    for c in prof["components"]:
        o, r = c["ours_s"]["median"], c["ref_s"]["median"]
        lines.append(f"| {c['component']} | {c.get('precision', 'fp32')} | {o:.3f} ({c['ours_cpu_s']['median']:.2f}) "
                     f"| {r:.3f} "
                     f"({c['ref_cpu_s']['median']:.2f}) | {c['flops'] / o / scale:.1f} | {c['flops'] / r / scale:.1f} "
                     f"| {c['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"

