"""The generation engine against HF ``generate`` on the composed torch reference, plus batching,
stopping, sampling, bucketing and scoring.

The model is ``mufun-tiny`` with a smaller Whisper (2 layers of width 32, 3 taps), so that encoding
30 s chunks on a CPU stays cheap. One module-scoped generator (batch 4, buckets (32, 1024), every
audio batch padded to 6 chunks) serves most tests, so the suite compiles the audio path once.
"""

import jax
import numpy as np
import pytest
import torch

from helpers import LM_HEAD_SCALE, jax_mufun_from_torch
from mufun_jax import audio
from mufun_jax.config import IMAGE_TOKEN_INDEX as AUDIO, WhisperConfig, preset
from mufun_jax.engine import Generator
from mufun_jax.generate import Request
from mufun_jax.sampling import SamplingParams, filter_logits
from mufun_jax.testing.torch_reference import TorchMuFun

MAX_NEW = 8


@pytest.fixture(scope="module")
def setup(torch_threads):
    cfg = preset("mufun-tiny").replace(
        whisper=WhisperConfig(num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                              encoder_ffn_dim=64),
        taps=(0, 1, 2), connector_type="blp_3i_2x")
    ref = TorchMuFun(cfg, seed=3)
    with torch.no_grad():
        ref.language_model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model = jax_mufun_from_torch(ref, cfg)
    rng = np.random.default_rng(0)
    v = cfg.qwen3.vocab_size
    text = lambda n: [int(x) for x in rng.integers(1, v, n)]
    noise = lambda n: (0.1 * rng.standard_normal(n)).astype(np.float32)
    one = noise(audio.CHUNK_SAMPLES)[None]  # (1, 480000)
    a, b = noise(audio.CHUNK_SAMPLES)[None], noise(audio.CHUNK_SAMPLES // 3)
    long = noise(int(2.5 * audio.CHUNK_SAMPLES))  # one 1-D waveform -> 3 chunks
    requests = [
        Request([*text(5), AUDIO, *text(4)], [one], seed=1),  # 309 tokens
        Request([*text(3), AUDIO, *text(2), AUDIO, *text(3)], [a, [b]], seed=2),  # 2 audios (one short): 608
        Request([*text(2), AUDIO, *text(9)], [long], seed=3),  # long audio, 3 chunks: 911
        Request(text(7), seed=4),  # text only
    ]
    gen = Generator(model, max_new_tokens=MAX_NEW, batch_size=4, buckets=(32, 1024), max_batch_chunks=6,
                    chunk_buckets=(6,), eos_token_id=())
    greedy = gen.generate(requests)
    # The reference's input: host log-mel of each audio's padded 30 s chunks (one call for all of them).
    waves = [audio.pad_chunks(audio.chunk(a) if np.ndim(a) == 1 else list(a)) for r in requests for a in r.audios]
    mel = np.array(jax.jit(audio.log_mel_spectrogram)(np.concatenate(waves)))
    mels = np.split(mel, np.cumsum([len(w) for w in waves])[:-1])
    for r in requests:
        r.mels = [torch.from_numpy(mels.pop(0)) for _ in r.audios]
    return cfg, ref, model, requests, gen, greedy


def hf_greedy(ref, req, n):
    with torch.no_grad():
        embeds, mask, _ = ref.splice([list(req.input_ids)], [req.mels], 4096)
        r = ref.language_model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                        output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                                        pad_token_id=0)
    logits = torch.stack(r.logits, 1)[0].double()
    tokens = r.sequences[0, -n:]
    lp = torch.log_softmax(logits, -1)[torch.arange(n), tokens]
    top2 = logits.topk(2, -1).values
    return tokens.numpy(), lp.numpy(), float((top2[:, 0] - top2[:, 1]).min())


def test_greedy_matches_hf_generate(setup):
    cfg, ref, _, requests, gen, greedy = setup
    worst_lp, worst_margin = 0.0, np.inf
    for i, (req, got) in enumerate(zip(requests, greedy)):
        tokens, lp, margin = hf_greedy(ref, req, MAX_NEW)
        worst_margin = min(worst_margin, margin)
        assert margin > 1e-2, f"row {i}: top-2 logit margin {margin:.3g} is too close to a tie to compare argmaxes"
        np.testing.assert_array_equal(got.token_ids, tokens, err_msg=f"row {i}")
        assert got.finish_reason == "length"
        worst_lp = max(worst_lp, float(np.max(np.abs(got.logprobs - lp))))
    print(f"greedy vs HF generate: tokens equal, max |logprob diff| {worst_lp:.2e}, "
          f"min top-2 margin {worst_margin:.3f}")
    assert worst_lp <= 1e-4


def test_batched_equals_one_by_one(setup):
    *_, requests, gen, greedy = setup
    for i, req in enumerate(requests):
        alone = gen.generate([req])[0]
        np.testing.assert_array_equal(alone.token_ids, greedy[i].token_ids, err_msg=f"row {i}")
        np.testing.assert_allclose(alone.logprobs, greedy[i].logprobs, rtol=0, atol=1e-5, err_msg=f"row {i}")
    # a row alone attends to a shorter span of the cache than the batch did (spans 512, 1024, 1032),
    # and gets the same answer; steady state: the same work again compiles nothing new
    compiles = dict(gen.compiles)
    assert gen.spans == (512, 1024, 1032) and 2 <= compiles["decode"] <= len(gen.spans), compiles
    for req in requests:
        gen.generate([req])
    assert dict(gen.compiles) == compiles, gen.compiles


def test_stop_token_and_max_new_tokens(setup):
    *_, requests, gen, greedy = setup
    # A row and a step k >= 1 at which greedy first produces some token; that token becomes the stop id.
    r, k = next((r, k) for k in range(MAX_NEW - 2, 0, -1) for r in range(4)
                if greedy[r].token_ids[k] not in greedy[r].token_ids[:k])
    toks = greedy[r].token_ids
    stop = int(toks[k])
    steps = gen.stats["decode_steps"]
    out = gen.generate([requests[r]], eos_token_id=[stop])[0]
    assert out.finish_reason == "stop"
    np.testing.assert_array_equal(out.token_ids, toks[:k + 1])
    assert gen.stats["decode_steps"] - steps == k  # token 0 comes from the prefill; the loop exited at the stop

    out = gen.generate(requests, eos_token_id=stop)
    for g, o in zip(greedy, out):
        hit = np.flatnonzero(g.token_ids == stop)
        n = hit[0] + 1 if len(hit) else MAX_NEW
        assert o.finish_reason == ("stop" if len(hit) else "length")
        np.testing.assert_array_equal(o.token_ids, g.token_ids[:n])

    requests = list(requests)
    requests[1] = Request(requests[1].input_ids, requests[1].audios, max_new_tokens=2)
    out = gen.generate(requests, max_new_tokens=5)
    assert [len(o.token_ids) for o in out] == [5, 2, 5, 5]
    for g, o in zip(greedy, out):
        assert o.finish_reason == "length"
        np.testing.assert_array_equal(o.token_ids, g.token_ids[:len(o.token_ids)])
        np.testing.assert_allclose(o.logprobs, g.logprobs[:len(o.logprobs)], atol=1e-5)
    assert gen.compiles["decode"] <= len(gen.spans)


def test_sampling_reproducible_and_batch_independent(setup):
    *_, requests, gen, greedy = setup
    r0 = requests[0]
    first = gen.generate([Request(r0.input_ids, r0.audios, seed=5)], temperature=2.0, top_p=0.95)[0]
    again = gen.generate([Request(r0.input_ids, r0.audios, seed=5)], temperature=2.0, top_p=0.95)[0]
    other = gen.generate([Request(r0.input_ids, r0.audios, seed=6)], temperature=2.0, top_p=0.95)[0]
    np.testing.assert_array_equal(first.token_ids, again.token_ids)
    assert not np.array_equal(first.token_ids, other.token_ids)
    assert not np.array_equal(first.token_ids, greedy[0].token_ids)
    # The same seed in another row, next to other requests, samples the same tokens.
    mixed = gen.generate([requests[3], Request(r0.input_ids, r0.audios, seed=5), requests[1]], temperature=2.0,
                         top_p=0.95)
    np.testing.assert_array_equal(mixed[1].token_ids, first.token_ids)
    top1 = gen.generate(requests, temperature=1.0, top_k=1)
    for g, o in zip(greedy, top1):
        np.testing.assert_array_equal(o.token_ids, g.token_ids)
        np.testing.assert_allclose(o.logprobs, g.logprobs, atol=1e-5)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (7, 0.5), (1, 0.9), (0, 0.05)])
def test_filter_logits_matches_hf_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(top_k).standard_normal((3, 50)).astype(np.float32) * 2
    want = torch.from_numpy(logits)
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(None, want)
    got = np.asarray(filter_logits(logits, SamplingParams.rows([SamplingParams(top_k=top_k, top_p=top_p)] * 3)))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want.numpy()))
    np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(got)])


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.1), (0, 1.0, 0.5), (5, 1.0, 0.3), (0, 0.8, 0.2),
                                               (0, 1.0, 1.0), (4, 0.9, 0.05)])
def test_min_p_matches_hf_warper(top_k, top_p, min_p):
    """min-p after top-k and top-p, HF's order; per-row settings (the last row has the filters off)."""
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(int(min_p * 100)).standard_normal((3, 50)).astype(np.float32) * 2
    want = torch.from_numpy(logits[:2])
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(None, want)
    want = MinPLogitsWarper(min_p)(None, want).numpy()
    params = [SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p)] * 2 + [SamplingParams()]
    got = np.asarray(filter_logits(logits, SamplingParams.rows(params)))
    np.testing.assert_array_equal(np.isfinite(got[:2]), np.isfinite(want))
    np.testing.assert_array_equal(got[:2][np.isfinite(want)], logits[:2][np.isfinite(want)])
    assert np.isfinite(got[2]).all()


def test_sampling_params_errors_name_the_value():
    with pytest.raises(ValueError, match=r"min_p=1.5 must be in \[0, 1\].*|top_p=0 must"):
        SamplingParams(min_p=1.5)
    with pytest.raises(ValueError, match="top_p=0 must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(TypeError, match="unknown sampling setting 'topp'"):
        SamplingParams.from_kwargs(topp=0.5)


def test_one_compile_per_bucket(setup):
    """Also runs the prefill in 16-token pieces, which must not change the result."""
    cfg, _, model, _, main_gen, _ = setup
    gen = Generator(model, max_new_tokens=4, batch_size=2, buckets=(16, 32), prefill_chunk=16, eos_token_id=())
    rng = np.random.default_rng(1)
    prompt = lambda n, seed=0: Request([int(x) for x in rng.integers(1, cfg.qwen3.vocab_size, n)], seed=seed)
    pair = [prompt(17), prompt(25)]
    chunked = gen.generate(pair)
    for c, w in zip(chunked, main_gen.generate(pair, max_new_tokens=4)):
        np.testing.assert_array_equal(c.token_ids, w.token_ids)
        np.testing.assert_allclose(c.logprobs, w.logprobs, atol=1e-5)
    work = lambda: (gen.generate([prompt(32)]),
                    gen.generate([prompt(20), prompt(30), prompt(19, 1), prompt(21)], temperature=0.7, top_k=5,
                                 eos_token_id=[3, 4]),
                    gen.generate([prompt(18)], max_new_tokens=2, top_p=0.5, temperature=1.0))
    work()
    compiles = dict(gen.compiles)
    # prefill: one program per (admission batch, suffix bucket) seen: (2, 32), (1, 32); decode: one
    assert compiles == {"prefill": 2, "decode": 1}, compiles
    work()  # the same shapes with other settings, seeds and stop ids: nothing new
    assert dict(gen.compiles) == compiles
    gen.generate([prompt(3)])  # a new suffix bucket (16)
    assert gen.compiles["prefill"] == 3 and gen.compiles["decode"] == 1, gen.compiles


def test_too_long_is_a_clear_error(setup):
    cfg, _, model, requests, *_ = setup
    gen = Generator(model, max_new_tokens=4, batch_size=2, buckets=(32, 512), max_chunks=4)
    with pytest.raises(ValueError, match=r"request 1: prompt has 909 tokens .* largest bucket 512"):
        gen.generate([Request([1, 2, 3]), Request([1, AUDIO, 2, 3, 4, 5, 6, 7, 8, 9], [np.zeros((3, 128, 3000))])])
    with pytest.raises(ValueError, match=r"request 0: 5 audio chunks, more than max_chunks=4"):
        gen.check(Request([1, AUDIO], [np.zeros((5, 128, 3000))]))
    with pytest.raises(ValueError, match="2 <audio> placeholders.*1 audios"):
        gen.check(Request([1, AUDIO, AUDIO], [np.zeros((1, 128, 3000))]))
    assert gen.check(Request([1, AUDIO, 2], [np.zeros((1, 128, 3000))])) == 302
    with pytest.raises(ValueError, match="max_new_tokens=5 must be in"):
        gen.generate([Request([1])], max_new_tokens=5)
    assert gen.num_compiles == 0


def test_score_ranks_and_matches_torch(setup):
    cfg, ref, _, requests, gen, greedy = setup
    rng = np.random.default_rng(2)
    req = requests[0]
    mel_req = Request(req.input_ids, [req.mels[0].numpy()])  # log-mel input instead of waveforms
    sampled = gen.generate([Request(req.input_ids, req.audios, seed=5)], temperature=2.0, top_p=0.95)[0]
    cands = [list(greedy[0].token_ids[:4]), *[list(rng.integers(1, cfg.qwen3.vocab_size, n)) for n in (2, 5)],
             list(sampled.token_ids)]
    scores = gen.score(mel_req, cands)
    assert int(np.argmax([s.total for s in scores[:3]])) == 0  # the model's own greedy answer ranks first
    np.testing.assert_allclose(scores[0].token_logprobs, greedy[0].logprobs[:4], atol=1e-5)
    # Sampling at temperature 2 reports log-probs under the untempered model, as scoring computes them.
    np.testing.assert_allclose(scores[-1].token_logprobs, sampled.logprobs, atol=1e-5)
    worst = 0.0
    with torch.no_grad():
        prompt, _, _ = ref.splice([list(req.input_ids)], [req.mels], 4096)  # encode the audio once
        p = prompt.shape[1]
        for c, s in zip(cands, scores):
            embeds = torch.cat([prompt, ref.language_model.get_input_embeddings()(torch.tensor([c]))], 1)
            lp = torch.log_softmax(ref.language_model(inputs_embeds=embeds).logits[0].double(), -1)
            want = lp[torch.arange(p - 1, p - 1 + len(c)), torch.tensor(c)].numpy()
            worst = max(worst, float(np.max(np.abs(s.token_logprobs - want))))
            assert abs(s.total - want.sum()) <= 1e-4
    print(f"score vs torch teacher-forced: max |logprob diff| {worst:.2e}")
    assert worst <= 1e-4
    assert gen.compiles["score"] == 1


# -- continuous batching, audio once, prefix reuse -----------------------------------------------


def test_prefix_reuse_and_audio_once_equal_no_reuse(setup):
    """Several questions about each of two songs whose prompts differ only after the audio: with the
    caches, each song is encoded and its prefix prefilled once; without them everything is computed
    per request. Greedy tokens are equal and log-probs agree within fp32 tolerance (1e-5)."""
    cfg, _, model, _, _, _ = setup
    rng = np.random.default_rng(7)
    v = cfg.qwen3.vocab_size
    head = [int(x) for x in rng.integers(1, v, 6)]  # the same system prompt + "USER:" for every request
    t = np.arange(audio.CHUNK_SAMPLES) / 16000
    songs = [(0.1 * rng.standard_normal(audio.CHUNK_SAMPLES)).astype(np.float32)[None],
             (0.8 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]]
    questions = [[int(x) for x in rng.integers(1, v, n)] for n in (3, 7, 12)]
    reqs = [Request([*head, AUDIO, *q], [song], seed=i) for i, (song, q) in
            enumerate((s, q) for s in songs for q in questions)]
    kw = dict(max_new_tokens=MAX_NEW, batch_size=2, buckets=(32, 1024), chunk_buckets=(6,), eos_token_id=())
    cached = Generator(model, **kw)
    plain = Generator(model, audio_cache_bytes=0, prefix_cache_bytes=0, **kw)
    a, b = cached.generate(reqs), plain.generate(reqs)
    assert cached.stats["audio_encoded"] == 2 and cached.stats["prefix_computed"] == 2
    assert cached.stats["prefix_reused"] == 4
    assert plain.stats["audio_encoded"] >= 4 and plain.stats["prefix_computed"] >= 4  # nothing kept
    assert len(cached.prefix_cache) == 2 and len(plain.prefix_cache) == 0
    for i, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(x.token_ids, y.token_ids, err_msg=str(i))
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5, err_msg=str(i))
    # the two songs share every token before the audio, but not their prefix: their answers differ
    assert all(not np.allclose(x.logprobs, y.logprobs, atol=1e-3) for x, y in zip(a[:3], a[3:]))


def test_continuous_batching_does_not_wait_for_long_answers(setup):
    """Two slots, one long answer and four short ones: the short ones stream out while the long one
    runs, the whole set takes about as many decode steps as the long answer alone, and every answer
    equals the one the request gets on its own."""
    cfg, _, model, _, _, _ = setup
    rng = np.random.default_rng(8)
    prompt = lambda n, cap: Request([int(x) for x in rng.integers(1, cfg.qwen3.vocab_size, n)], max_new_tokens=cap)
    reqs = [prompt(9, 24)] + [prompt(5 + i, 3) for i in range(4)]
    gen = Generator(model, max_new_tokens=24, batch_size=2, buckets=(32,), eos_token_id=(), decode_steps=4)
    order = [i for i, _ in gen.stream(reqs)]
    assert order[-1] == 0 and sorted(order) == list(range(5))  # the long one finishes last
    assert gen.stats["decode_steps"] <= 24  # the short ones ran beside it, not after it
    for i, r in enumerate(reqs):
        alone = gen.generate([r])[0]
        together = dict(gen.stream(reqs))[i]
        np.testing.assert_array_equal(alone.token_ids, together.token_ids)
        assert len(alone.token_ids) == r.max_new_tokens


def test_lru_cache_is_bounded_in_bytes():
    from mufun_jax.engine import LRUCache

    c = LRUCache(max_bytes=3 * 400)
    for i in range(5):
        c.put(i, np.zeros(100, np.float32))  # 400 bytes each
    assert len(c) == 3 and c.bytes == 1200 and c.get(0) is None and c.get(4) is not None
    c.get(2)  # used: 3 becomes the oldest
    c.put(5, np.zeros(100, np.float32))
    assert c.get(3) is None and c.get(2) is not None
    c.put("big", np.zeros(1000, np.float32))  # larger than the bound: not kept, nothing evicted for it
    assert c.get("big") is None and len(c) == 3


def test_long_audio_and_long_answers_beside_short_ones_compile_once(setup):
    """A 5-minute song (10 chunks) with a long answer runs in the same slots as short requests; a
    second run with other lengths, caps and seeds compiles nothing new."""
    cfg, _, model, _, _, _ = setup
    rng = np.random.default_rng(9)
    v = cfg.qwen3.vocab_size
    text = lambda n: [int(x) for x in rng.integers(1, v, n)]
    song = (0.1 * rng.standard_normal(10 * audio.CHUNK_SAMPLES)).astype(np.float32)  # 300 s: 10 chunks
    clip = (0.1 * rng.standard_normal(audio.CHUNK_SAMPLES // 2)).astype(np.float32)
    gen = Generator(model, max_new_tokens=48, batch_size=2, buckets=(32, 512, 3072), max_chunks=10,
                    chunk_buckets=(1, 2, 4, 16), eos_token_id=(), decode_steps=8)

    def run(seed):
        reqs = [Request([*text(4), AUDIO, *text(9)], [song], seed=seed, max_new_tokens=48),
                Request(text(5 + seed), seed=seed, max_new_tokens=3),
                Request([*text(3), AUDIO, *text(4)], [clip], seed=seed, max_new_tokens=5),
                Request(text(20), seed=seed, max_new_tokens=2)]
        return reqs, gen.generate(reqs, temperature=0.5 * seed)

    reqs, out = run(0)
    assert [len(o.token_ids) for o in out] == [48, 3, 5, 2]
    assert gen.check(reqs[0]) == 3000 + 13
    compiles = dict(gen.compiles)
    run(1)
    assert dict(gen.compiles) == compiles, (compiles, gen.compiles)


def test_encoder_padding_is_filled_with_waiting_songs(setup):
    """An encoder batch padded to its chunk bucket takes the audio of requests still waiting for a
    slot instead of zeros: four one-chunk songs through one slot encode in one call of 4 chunks,
    not four calls of 1 chunk + 3 padding rows. Tokens and log-probs equal those of a generator
    that encodes each song on its own (no audio cache, so nothing is prefetched)."""
    cfg, _, model, _, _, _ = setup
    rng = np.random.default_rng(11)
    v = cfg.qwen3.vocab_size
    songs = [(0.2 * rng.standard_normal(audio.CHUNK_SAMPLES)).astype(np.float32)[None] for _ in range(4)]
    reqs = [Request([*[int(x) for x in rng.integers(1, v, 4)], AUDIO, 7, 9], [s], seed=i) for i, s in enumerate(songs)]
    kw = dict(max_new_tokens=4, batch_size=1, buckets=(32, 1024), chunk_buckets=(4,), eos_token_id=())
    filled, alone = Generator(model, **kw), Generator(model, audio_cache_bytes=0, **kw)
    a, b = filled.generate(reqs), alone.generate(reqs)
    assert filled.stats["encoder_chunks"] == 4 and filled.stats["encoder_padding"] == 0
    assert filled.stats["audio_prefetched"] == 3 and filled.cache_stats()["audio"]["hits"] == 3  # found when admitted
    assert alone.stats["encoder_chunks"] == 4 and alone.stats["encoder_padding"] == 12
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.token_ids, y.token_ids)
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5)
