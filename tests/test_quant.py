"""Weight-only int8 / NF4 quantisation: what it costs in accuracy against bf16, what it saves in
bytes, and that the engine (continuous batching, scoring) runs the quantised model exactly.

Exactness is checked against the PyTorch reference loaded with the *dequantised* weights: a
quantised model is the float model whose weights are ``codes * scale``, so HF ``generate`` on those
weights is its reference, at the usual fp32 tolerances. The accuracy cost is a separate question,
measured against the bf16 model with stated bounds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from flax.traverse_util import flatten_dict

from helpers import LM_HEAD_SCALE, jax_mufun_from_torch, small_cfg
from mufun_jax.config import RunSettings, preset
from mufun_jax.convert import flax_to_torch
from mufun_jax.engine import Generator
from mufun_jax.generate import Request
from mufun_jax.models import MuFun
from mufun_jax.models.lora import merge_params
from mufun_jax.models.quant import dequantize_kernel, int8_quantize, nf4_quantize, param_bytes, quantize_params
from mufun_jax import audio
from mufun_jax.config import IMAGE_TOKEN_INDEX as AUDIO
from mufun_jax.testing.torch_reference import TorchMuFun

MAX_NEW = 8


@pytest.fixture(scope="module")
def setup(torch_threads):
    """test_generate's small model (its lm_head scaled so greedy choices are far from ties) and
    three requests: one with 30 s of audio, two text only."""
    cfg = small_cfg()
    ref = TorchMuFun(cfg, seed=3)
    with torch.no_grad():
        ref.language_model.lm_head.weight.mul_(LM_HEAD_SCALE)
    rng = np.random.default_rng(0)
    text = lambda n: [int(x) for x in rng.integers(1, cfg.qwen3.vocab_size, n)]
    wave = (0.1 * rng.standard_normal((1, audio.CHUNK_SAMPLES))).astype(np.float32)
    requests = [Request([*text(5), AUDIO, *text(4)], [wave], seed=1), Request(text(7), seed=2),
                Request(text(5), seed=3)]
    requests[0].mels = [torch.from_numpy(np.array(jax.jit(audio.log_mel_spectrogram)(wave)))]
    requests[1].mels = requests[2].mels = []
    return cfg, ref, jax_mufun_from_torch(ref, cfg), requests


def quantized(model, mode: str, dtype: str = "float32"):
    """``model``'s weights quantised into a MuFun built with ``quantize=mode``."""
    run = RunSettings(dtype=dtype, param_dtype=dtype, quantize=mode)
    q = MuFun(model.cfg, run, rngs=nnx.Rngs(0))
    state = nnx.state(q)
    float_params = jax.tree.map(lambda a: a.astype(run.param_dtype), nnx.to_pure_dict(nnx.state(model)))
    nnx.replace_by_pure_dict(state, quantize_params(float_params, nnx.to_pure_dict(state)))
    nnx.update(q, state)
    return q


def dequantized_reference(q, cfg) -> TorchMuFun:
    """The torch reference holding the quantised model's effective weights (codes x scales)."""
    flat = {p: np.asarray(v, np.float32) for p, v in flatten_dict(merge_params(nnx.to_pure_dict(nnx.state(q)),
                                                                           1.0)).items()}
    ref = TorchMuFun(cfg, seed=0)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in flax_to_torch(flat, cfg).items()}
    ref.load_state_dict(sd, strict=True)
    return ref


def test_int8_and_nf4_round_trip():
    """The arithmetic: int8 within half a step of the per-channel scale; NF4 codes round to the
    nearest of the 16 levels of each 64-row block; packing keeps every code."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((2, 128, 24)).astype(np.float32))
    q, s = int8_quantize(w)
    assert q.dtype == jnp.int8 and q.shape == w.shape and s.shape == (2, 24)
    err = jnp.abs(dequantize_kernel(q, s) - w)
    assert float(jnp.max(err / s[:, None, :])) <= 0.5 + 1e-5
    packed, scale = nf4_quantize(w)
    assert packed.dtype == jnp.uint8 and packed.shape == (2, 64, 24) and scale.shape == (2, 2, 24)
    back = dequantize_kernel(packed, scale)
    # the largest gap between NF4 levels is 0.304 (of the block's absmax), so the error is at most half of it
    blocks = jnp.repeat(scale, 64, axis=1)
    assert float(jnp.max(jnp.abs(back - w) / blocks)) <= 0.153
    assert float(jnp.max(jnp.abs(back) - blocks)) <= 1e-6  # nothing beyond the block's absmax


def torch_teacher_forced(ref, req, tokens):
    """HF's log-probs and logits at the positions that predict ``tokens`` after the prompt."""
    with torch.no_grad():
        prompt, _, _ = ref.splice([list(req.input_ids)], [req.mels], 4096)
        embeds = torch.cat([prompt, ref.language_model.get_input_embeddings()(torch.tensor([list(tokens)]))], 1)
        logits = ref.language_model(inputs_embeds=embeds).logits[0].double()
    at = torch.arange(prompt.shape[1] - 1, prompt.shape[1] - 1 + len(tokens))
    return torch.log_softmax(logits, -1)[at, torch.tensor(tokens)].numpy(), logits[at].numpy()


@pytest.mark.parametrize("mode", ["int8", pytest.param("nf4", marks=pytest.mark.slow)])
def test_engine_on_the_quantized_model_equals_hf_on_its_weights(setup, mode):
    """Continuous batching (2 slots, 3 requests, so the third waits for a free slot; one with audio) and scoring
    on the quantised model against HF on the dequantised weights: every generated token is HF's argmax given the tokens
    before it (within 1e-4 of the top logit, so a near-tie cannot fail it), and the log-probs of the
    engine (KV cache) and of scoring (no cache) equal HF's teacher-forced ones within 1e-4."""
    cfg, _, model, requests = setup
    q = quantized(model, mode)
    ref = dequantized_reference(q, cfg)
    gen = Generator(q, max_new_tokens=MAX_NEW, batch_size=2, buckets=(32, 512), max_batch_chunks=1,
                    chunk_buckets=(1,), eos_token_id=())
    got = gen.generate(requests)
    worst = 0.0
    for i, (req, g) in enumerate(zip(requests, got)):
        lp, logits = torch_teacher_forced(ref, req, g.token_ids)
        chosen = logits[np.arange(len(g.token_ids)), g.token_ids]
        assert np.all(chosen >= logits.max(-1) - 1e-4), f"{mode} row {i}: a generated token is not the argmax"
        worst = max(worst, float(np.max(np.abs(g.logprobs - lp))))
        scores = gen.score(req, [list(g.token_ids)])
        worst = max(worst, float(np.max(np.abs(scores[0].token_logprobs - lp))))
    print(f"{mode}: engine and scoring vs HF on the dequantised weights: greedy, max |logprob diff| {worst:.2e}")
    assert worst <= 1e-4


@pytest.mark.slow  # cost in the quick tier's 10 minutes; the quick tier keeps a cheaper test of the same module
def test_accuracy_against_bf16(setup):
    """Teacher-forced next-token predictions of the quantised model against the bf16 model on the
    same inputs (text and audio): the greedy agreement rate and the largest logit difference, each
    with a bound. The bounds are for this random tiny model, whose logits are flatter than a
    trained model's (ties are closer), so they are conservative for real checkpoints."""
    cfg, _, model, _ = setup
    run = RunSettings(dtype="bfloat16", param_dtype="bfloat16")
    base = MuFun(cfg, run, rngs=nnx.Rngs(0))
    st = nnx.state(base)
    nnx.replace_by_pure_dict(st, jax.tree.map(lambda a: a.astype(jnp.bfloat16), nnx.to_pure_dict(nnx.state(model))))
    nnx.update(base, st)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(1, cfg.qwen3.vocab_size, (4, 64)))
    mel = jnp.asarray(rng.uniform(-1.5, 1.5, (2, cfg.whisper.num_mel_bins, cfg.whisper.num_frames)), jnp.float32)
    want_logits, _ = base(ids)
    want_audio = base.encode_audio(mel).astype(jnp.float32)
    bounds = {"int8": (0.95, 0.08, 0.03), "nf4": (0.45, 0.50, 0.25)}  # agreement >=, |dlogit| / max|logit| <=, audio
    for mode, (agree_min, logit_max, audio_max) in bounds.items():
        q = quantized(model, mode, "bfloat16")
        logits, _ = q(ids)
        agree = float(jnp.mean(logits.argmax(-1) == want_logits.argmax(-1)))
        dlogit = float(jnp.max(jnp.abs(logits - want_logits)) / jnp.max(jnp.abs(want_logits)))
        daudio = float(jnp.max(jnp.abs(q.encode_audio(mel).astype(jnp.float32) - want_audio))
                       / jnp.max(jnp.abs(want_audio)))
        print(f"{mode} vs bf16: greedy agreement {agree:.3f} (bound >= {agree_min}), max |logit diff| "
              f"{dlogit:.3f} of the largest logit (<= {logit_max}), audio embeddings {daudio:.3f} (<= {audio_max})")
        assert agree >= agree_min and dlogit <= logit_max and daudio <= audio_max, mode


@pytest.mark.slow  # cost in the quick tier's 10 minutes; the int8 engine parity test stays quick
def test_parameter_bytes_halve():
    """Measured on a small model's arrays, and on the 8B model's shapes (nothing allocated)."""
    cfg = small_cfg().replace(qwen3=preset("mufun-tiny").qwen3.__class__(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, tie_word_embeddings=False))
    bf16 = RunSettings(dtype="bfloat16", param_dtype="bfloat16")
    sizes = {}
    for mode in (None, "int8", "nf4"):
        m = MuFun(cfg, bf16.replace(quantize=mode), rngs=nnx.Rngs(0))
        sizes[mode] = param_bytes(nnx.state(m.language_model)) + param_bytes(nnx.state(m.connector))
    from mufun_jax.loading import abstract_model

    big = {mode: param_bytes(nnx.state(abstract_model(preset("mufun-8b"), bf16.replace(quantize=mode))))
           for mode in (None, "int8", "nf4")}
    print(f"small LLM + connector: int8 {sizes['int8'] / sizes[None]:.3f}, nf4 {sizes['nf4'] / sizes[None]:.3f} of "
          f"bf16; mufun-8b: bf16 {big[None] / 2**30:.2f} GiB, int8 {big['int8'] / 2**30:.2f} GiB "
          f"({big['int8'] / big[None]:.3f}), nf4 {big['nf4'] / 2**30:.2f} GiB ({big['nf4'] / big[None]:.3f})")
    assert sizes["int8"] <= 0.52 * sizes[None] and sizes["nf4"] <= 0.35 * sizes[None]  # nf4 keeps an int8 embedding
    assert big["int8"] <= 0.51 * big[None] and big["nf4"] <= 0.30 * big[None]
