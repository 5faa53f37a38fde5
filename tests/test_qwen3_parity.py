"""Qwen3 decoder against HF ``Qwen3ForCausalLM`` (fp32): padded batches, tied/untied heads, KV cache."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import FP32_TOL, rel_err
from mufun_jax.config import preset
from mufun_jax.convert import load_params, torch_to_flax
from mufun_jax.models import KVCache, Qwen3ForCausalLM
from mufun_jax.testing.torch_reference import hf_qwen3


def build(tied: bool, seed: int = 0):
    cfg = dataclasses.replace(preset("mufun-tiny").qwen3, tie_word_embeddings=tied)
    assert cfg.num_attention_heads > cfg.num_key_value_heads  # GQA
    ref = hf_qwen3(cfg, seed)
    model = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0))
    full = preset("mufun-tiny").replace(qwen3=cfg)
    load_params(model, torch_to_flax(ref.state_dict(), full, component="qwen3"))
    return cfg, ref, model


def right_padded_batch(rng, vocab, lengths, pad_id=0):
    t = max(lengths)
    ids = np.full((len(lengths), t), pad_id, np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, vocab, n)
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("tied", [False, True])
def test_logits_right_padded_batch(torch_threads, tied):
    cfg, ref, model = build(tied, seed=10 + tied)
    ids, mask = right_padded_batch(np.random.default_rng(0), cfg.vocab_size, [13, 7, 10])
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   position_ids=torch.from_numpy(pos.copy())).logits.numpy()
    got, _ = model(jnp.asarray(ids), positions=jnp.asarray(pos), segment_ids=jnp.asarray(mask))
    got = np.asarray(got)
    real = mask.astype(bool)
    err = rel_err(got[real], want[real])
    print(f"qwen3 tied={tied} logits rel err {err:.2e}")
    assert err <= FP32_TOL


@pytest.mark.parametrize("tied", [False, True])
def test_cached_decode_equals_full_forward(torch_threads, tied):
    """Prefill a right-padded batch into a KV cache, then feed one token at a time (each row at
    its own position); every step's logits must equal the full forward over the whole sequence."""
    cfg, ref, model = build(tied, seed=20 + tied)
    rng = np.random.default_rng(1)
    b, total = 2, 16
    seq = rng.integers(1, cfg.vocab_size, (b, total))
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(seq)).logits.numpy()
    full, _ = model(jnp.asarray(seq))
    assert rel_err(full, want) <= FP32_TOL

    prompt_lens = np.array([5, 9])
    p = int(prompt_lens.max())
    prompt = np.where(np.arange(p)[None] < prompt_lens[:, None], seq[:, :p], 0)
    cache = KVCache.init(cfg, b, total)
    positions = np.broadcast_to(np.arange(p), (b, p))
    logits, cache = model(jnp.asarray(prompt), positions=jnp.asarray(positions), cache=cache)
    logits = np.asarray(logits)
    for i in range(b):
        n = prompt_lens[i]
        assert rel_err(logits[i, :n], want[i, :n]) <= FP32_TOL
    errs = []
    for step in range(total - p):
        pos = prompt_lens + step
        tok = seq[np.arange(b), pos]
        logits, cache = model(jnp.asarray(tok[:, None]), positions=jnp.asarray(pos[:, None]), cache=cache)
        errs.append(rel_err(np.asarray(logits)[:, 0], want[np.arange(b), pos]))
    print(f"qwen3 tied={tied} cached decode max rel err {max(errs):.2e} over {len(errs)} steps")
    assert max(errs) <= FP32_TOL


def test_input_ids_xor_inputs_embeds():
    cfg, _, model = build(False)
    with pytest.raises(ValueError, match="exactly one"):
        model(jnp.zeros((1, 3), jnp.int32), inputs_embeds=jnp.zeros((1, 3, cfg.hidden_size)))


def test_fused_gate_up_matches_hf_logits_and_gradients(torch_threads, monkeypatch):
    """A long sequence takes Qwen3MLP's joint gate/up matmul (CPU, >= FUSED_GATE_UP_MIN_ROWS rows):
    its logits and every parameter gradient against HF's, fp32. The HF gradients go through our own
    checkpoint mapping, so each lands on the parameter it belongs to."""
    import jax

    from mufun_jax.models import qwen3

    taken = []
    fuse = qwen3.Qwen3MLP._fuse_gate_up
    monkeypatch.setattr(qwen3.Qwen3MLP, "_fuse_gate_up", lambda self, x: taken.append(fuse(self, x)) or taken[-1])
    cfg, ref, model = build(False, seed=30)
    rng = np.random.default_rng(3)
    t = qwen3.FUSED_GATE_UP_MIN_ROWS + 40
    ids = rng.integers(1, cfg.vocab_size, (1, t))
    w = rng.standard_normal((1, t, cfg.vocab_size)).astype(np.float32)

    logits_t = ref(input_ids=torch.from_numpy(ids)).logits
    (logits_t * torch.from_numpy(w)).sum().backward()
    want_grads = Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(1))
    full = preset("mufun-tiny").replace(qwen3=cfg)
    load_params(want_grads, torch_to_flax({k: p.grad for k, p in ref.named_parameters()}, full, component="qwen3"))

    gd, st = nnx.split(model, nnx.Param)

    def loss(st):
        logits, _ = nnx.merge(gd, st)(jnp.asarray(ids))
        return jnp.sum(logits * w), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(st)
    assert taken and all(taken), "the long sequence should take the fused gate/up path"
    assert rel_err(logits, logits_t.detach().numpy()) <= FP32_TOL
    want = dict(nnx.to_flat_state(nnx.state(want_grads, nnx.Param)))
    got = dict(nnx.to_flat_state(grads))
    assert set(got) == set(want)
    errs = {k: rel_err(got[k][...], want[k][...]) for k in got}
    print(f"qwen3 fused gate/up: max gradient rel err {max(errs.values()):.2e} over {len(errs)} tensors")
    assert max(errs.values()) <= FP32_TOL, {k: e for k, e in errs.items() if e > FP32_TOL}
