"""The training workload of bench/compare.py: our ``Trainer`` on packed batches against the
reference's recipe (right-padded batches, HF loss, fused AdamW, clipping, gradient accumulation),
full fine-tuning and the warmup recipe (connector only), each side in a fresh child process per
round; and its rows of the results table (throughput, CPU seconds, FLOP/s, padding, compile time,
peak memory)."""

from __future__ import annotations

import sys
import time

from .children import run_once
from .rows import row, stats
from .settings import Settings, autocast, build_reference, device_mem_jax, jax_facts, log, model_config, rss_mb, \
    run_settings, torch_facts
from .synthetic import choose_packing, computed_train_flops, expanded, label_tokens, make_samples, train_flops


# -- our side (in a child) ------------------------------------------------------------------------


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


def ours_train_child(s: Settings) -> dict:
    samples = make_samples(s, s.train_samples, s.seed)
    warm = make_samples(s, s.warm_samples, s.seed + 1)
    out = {"facts": jax_facts()}
    out["train_full"] = ours_train(s, "full", samples, warm)
    out["peak_rss_mb"] = rss_mb()
    out.update(device_mem_jax())
    out["train_warmup"] = ours_train(s, "warmup", samples, warm)
    return out


def ref_forward(ref, fe, samples, s: Settings):
    """TinyLLaVA's training forward: every chunk of the batch through the encoder at once, splice at
    -200, right-pad embeddings (zeros) and labels (-100) to the longest row, HF loss."""
    import torch

    from mufun_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    dev = "cuda" if s.device == "gpu" else "cpu"
    chunks = [c for smp in samples for per in smp.chunks for c in per]
    mel = fe(chunks, sampling_rate=16000, return_tensors="np").input_features
    with autocast(s):
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
    with autocast(s):
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
                loss = ref_forward(ref, fe, b, s) / len(group)
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
    out["peak_rss_mb"] = rss_mb()
    if s.device == "gpu":
        out["peak_device_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["train_warmup"] = ref_train(s, "warmup", samples, warm)
    return out


def ours_ops(s: Settings, workdir: str):
    return {"run": lambda: ours_train_child(s)}


def ref_ops(s: Settings, workdir: str):
    return {"run": lambda: ref_train_child(s)}


# -- the parent -----------------------------------------------------------------------------------


def run_training(s: Settings, repeats: int, timeout: float) -> dict:
    train = {"ours": [], "ref": []}
    for rep in range(repeats):
        for side in (("ours", "ref") if rep % 2 == 0 else ("ref", "ours")):
            print(f"training, round {rep + 1}/{repeats}: {side} ...", file=sys.stderr, flush=True)
            train[side].append(run_once(f"{side}_train", s, timeout))
    return train


def rows(s: Settings, train: dict, peak_tflops: float | None) -> list[dict]:
    """Per recipe: samples/s (target 1.5x for full training), label tokens/s, CPU s per sample,
    achieved FLOP/s, the useful share of the computed FLOPs, MFU (with a peak), our compile time."""
    out = []
    unit, scale = ("TFLOP/s", 1e12) if s.device == "gpu" else ("GFLOP/s", 1e9)
    for key, label, target in (("train_full", "training, full", 1.5),
                               ("train_warmup", "training, warmup recipe", None)):
        g = lambda side, field: [r[key][field] for r in train[side]]
        out.append(row(label, "samples/s", g("ours", "samples_per_s"), g("ref", "samples_per_s"), target=target))
        out.append(row(label, "label tokens/s", g("ours", "label_tokens_per_s"), g("ref", "label_tokens_per_s")))
        out.append(row(label, "process CPU s per sample",
                       [r[key]["cpu_s"] / r[key]["samples"] for r in train["ours"]],
                       [r[key]["cpu_s"] / r[key]["samples"] for r in train["ref"]], higher_is_better=False))
        out.append(row(label, f"achieved {unit}", [x / scale for x in g("ours", "achieved_flops_per_s")],
                       [x / scale for x in g("ref", "achieved_flops_per_s")]))
        out.append(row(label, "useful / computed FLOPs (padding)",
                       [r[key]["useful_flops"] / r[key]["computed_flops"] for r in train["ours"]],
                       [r[key]["useful_flops"] / r[key]["computed_flops"] for r in train["ref"]]))
        if peak_tflops:
            out.append(row(label, "MFU", [x / (peak_tflops * 1e12) for x in g("ours", "achieved_flops_per_s")],
                           [x / (peak_tflops * 1e12) for x in g("ref", "achieved_flops_per_s")]))
        out.append({"row": label, "metric": "compile s (ours only)", "ours": stats(g("ours", "compile_s")),
                    "reference": None, "ratio": None})
    return out


def memory_rows(train: dict) -> list[dict]:
    """Peak RSS of each side's full training (and peak device memory where both sides report it)."""
    out = [row("peak RSS, full training", "MB", [r["peak_rss_mb"] for r in train["ours"]],
               [r["peak_rss_mb"] for r in train["ref"]], higher_is_better=False)]
    if all("peak_device_mem_mb" in r for r in train["ours"] + train["ref"]):
        out.append(row("peak device memory, full training", "MB", [r["peak_device_mem_mb"] for r in train["ours"]],
                       [r["peak_device_mem_mb"] for r in train["ref"]], higher_is_better=False))
    return out
