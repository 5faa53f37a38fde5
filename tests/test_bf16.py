"""bf16 against torch in bf16: the Whisper encoder's taps, Qwen3's logits and Qwen3's training
gradients, each side computing in bf16, both measured against the fp32 reference.

The stated tolerance is honest about bf16: ours must sit within about twice torch's own bf16 error
(its distance from the fp32 result) plus a small floor, and within a stated distance of torch's bf16
result. Plain fp32 tolerances would fail for both sides; a loose fixed tolerance would hide a real
error (an fp32-only path quietly running in bf16 twice, say). The fp32 parity tests stay elsewhere
(test_whisper_parity, test_qwen3_parity, test_mufun_parity); here the precision is the subject."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import rel_err
from helpers import jax_mufun_from_torch, random_mel
from mufun_jax.config import RunSettings, preset
from mufun_jax.convert import load_params, torch_to_flax
from mufun_jax.models import Qwen3ForCausalLM
from mufun_jax.testing.torch_reference import TorchMuFun, hf_qwen3


def within_bf16(ours, torch_bf16, want_fp32, *, factor=2.0, floor=2e-3, direct=None, what=""):
    """ours (bf16) is at most ``factor`` x torch's bf16 error from the fp32 result (+ ``floor``), and at
    most ``direct`` from torch's bf16 result; returns the three errors for the test's printout."""
    e_ours, e_torch = rel_err(ours, want_fp32), rel_err(torch_bf16, want_fp32)
    e_pair = rel_err(ours, torch_bf16)
    print(f"{what}: ours-bf16 vs fp32 {e_ours:.2e}, torch-bf16 vs fp32 {e_torch:.2e}, ours vs torch-bf16 {e_pair:.2e}")
    assert e_torch > 0, f"{what}: torch's bf16 result equals its fp32 one: the bf16 side did not run in bf16"
    assert e_ours > 0, f"{what}: ours equals the fp32 result: our side did not compute in bf16"
    assert e_ours <= factor * e_torch + floor, what
    if direct is not None:
        assert e_pair <= direct, what
    return e_ours, e_torch, e_pair


def test_whisper_taps_in_bf16(torch_threads):
    cfg = preset("mufun-tiny")
    ref = TorchMuFun(cfg, seed=1)
    model = jax_mufun_from_torch(ref, cfg, RunSettings(dtype="bfloat16", param_dtype="bfloat16"))
    mel = random_mel(np.random.default_rng(0), 2, cfg)
    enc = ref.vision_tower._vision_tower
    with torch.no_grad():
        want = enc(torch.from_numpy(mel), output_hidden_states=True).hidden_states
        half = copy.deepcopy(enc).to(torch.bfloat16)(torch.from_numpy(mel).to(torch.bfloat16),
                                                      output_hidden_states=True).hidden_states
    for tap, got in zip(cfg.taps, model.encoder(jnp.asarray(mel))):
        assert got.dtype == jnp.bfloat16
        within_bf16(np.asarray(got, np.float32), half[tap].float().numpy(), want[tap].numpy(), direct=3e-2,
                    what=f"whisper tap {tap}")


def _qwen3_pair(seed: int, run: RunSettings):
    cfg = preset("mufun-tiny").qwen3
    ref = hf_qwen3(cfg, seed)
    model = Qwen3ForCausalLM(cfg, dtype=jnp.dtype(run.dtype), param_dtype=jnp.dtype(run.param_dtype),
                             rngs=nnx.Rngs(0))
    load_params(model, torch_to_flax(ref.state_dict(), preset("mufun-tiny"), component="qwen3"))
    return cfg, ref, model


def test_qwen3_logits_in_bf16(torch_threads):
    """bf16 weights and compute (inference), against HF's model as bf16 modules; the greedy token
    agrees with torch's bf16 choice on at least 95 % of positions."""
    cfg, ref, model = _qwen3_pair(30, RunSettings(dtype="bfloat16", param_dtype="bfloat16"))
    ids = np.random.default_rng(2).integers(1, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
        half = copy.deepcopy(ref).to(torch.bfloat16)(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    got, _ = model(jnp.asarray(ids))
    got = np.asarray(got, np.float32)
    within_bf16(got, half, want, direct=3e-2, what="qwen3 logits")
    agree = float(np.mean(got.argmax(-1) == half.argmax(-1)))
    print(f"greedy agreement with torch bf16: {agree:.3f}")
    assert agree >= 0.95


def test_qwen3_training_gradients_in_bf16(torch_threads):
    """bf16 compute with fp32 master weights (the training setting) against torch's bf16 autocast
    (HF Trainer's bf16=True): the loss and every weight's gradient."""
    cfg, ref, model = _qwen3_pair(31, RunSettings(dtype="bfloat16"))
    rng = np.random.default_rng(3)
    ids = rng.integers(1, cfg.vocab_size, (2, 32))
    labels = rng.integers(0, cfg.vocab_size, (2, 32))

    def torch_grads(autocast: bool):
        m = copy.deepcopy(ref).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = m(input_ids=torch.from_numpy(ids)).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab_size),
                                                 torch.from_numpy(labels).reshape(-1))
        loss.backward()
        grads = {k: p.grad for k, p in m.named_parameters()}
        return loss.item(), torch_to_flax(grads, preset("mufun-tiny"), component="qwen3")

    def loss_fn(m):
        logits, _ = m(jnp.asarray(ids))
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.mean(jnp.take_along_axis(lp, jnp.asarray(labels)[..., None], -1))

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    ours = {tuple(str(p) for p in k): np.asarray(v.get_value() if hasattr(v, "get_value") else v.value, np.float32)
            for k, v in nnx.to_flat_state(grads)}
    loss32, want = torch_grads(False)
    loss16, half = torch_grads(True)
    print(f"loss: ours bf16 {float(loss):.5f}, torch autocast {loss16:.5f}, fp32 {loss32:.5f}")
    assert abs(float(loss) - loss32) <= 2 * abs(loss16 - loss32) + 2e-3
    assert set(ours) == set(want), sorted(set(ours) ^ set(want))[:5]
    worst = max(within_bf16(ours[k], half[k], want[k], factor=2.5, floor=5e-3, what=".".join(k))[0] for k in want)
    print(f"worst gradient error against fp32: {worst:.2e}")

