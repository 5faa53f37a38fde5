"""Whisper encoder taps, pooled features and connector output against HF PyTorch (fp32)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import FP32_TOL, rel_err
from helpers import jax_mufun_from_torch, random_mel
from mufun_jax.config import MuFunConfig, WhisperConfig, preset
from mufun_jax.testing.torch_reference import TorchMuFun


@pytest.fixture(scope="module")
def pair(torch_threads):
    cfg = preset("mufun-tiny")
    ref = TorchMuFun(cfg, seed=1)
    return cfg, ref, jax_mufun_from_torch(ref, cfg)


def test_every_tap_matches_hf_hidden_states(pair):
    cfg, ref, model = pair
    mel = random_mel(np.random.default_rng(0), 2, cfg)
    with torch.no_grad():
        hs = ref.vision_tower._vision_tower(torch.from_numpy(mel), output_hidden_states=True).hidden_states
    assert len(hs) == cfg.whisper.encoder_layers + 1
    taps = model.encoder(jnp.asarray(mel))
    assert len(taps) == len(cfg.taps)
    for tap, got in zip(cfg.taps, taps):
        want = hs[tap].numpy()
        assert got.shape == want.shape == (2, 1500, cfg.whisper.d_model)
        err = rel_err(got, want)
        print(f"tap {tap}: rel err {err:.2e}")
        assert err <= FP32_TOL, f"tap {tap}"


@pytest.mark.parametrize("taps", [(0,), (1, 3), (0, 1, 2, 3), (2, 4), (0, 1, 2, 3, 4)])
def test_one_scan_collects_any_taps(pair, taps):
    """Whisper runs as one scan up to the deepest tap, collecting the tapped states on the side: any
    tap set gives HF's hidden states (taps before the last layer are raw block outputs)."""
    cfg, ref, model = pair
    from mufun_jax.models import WhisperEncoder

    enc = WhisperEncoder(cfg.whisper, taps=taps, rngs=nnx.Rngs(0))
    nnx.update(enc, nnx.state(model.encoder))
    mel = random_mel(np.random.default_rng(5), 1, cfg)
    with torch.no_grad():
        hs = ref.vision_tower._vision_tower(torch.from_numpy(mel), output_hidden_states=True).hidden_states
    got = enc(jnp.asarray(mel))
    assert len(got) == len(taps)
    for tap, g in zip(taps, got):
        assert rel_err(g, hs[tap].numpy()) <= FP32_TOL, tap


def test_last_tap_is_after_final_layer_norm(pair):
    """Tap L must be LN(block L output), i.e. HF's last_hidden_state, not the raw block output."""
    cfg, ref, model = pair
    mel = random_mel(np.random.default_rng(1), 1, cfg)
    with torch.no_grad():
        last = ref.vision_tower._vision_tower(torch.from_numpy(mel)).last_hidden_state.numpy()
    assert cfg.taps[-1] == cfg.whisper.encoder_layers
    assert rel_err(model.encoder(jnp.asarray(mel))[-1], last) <= FP32_TOL


def test_pooled_features_and_connector(pair):
    cfg, ref, model = pair
    mel = random_mel(np.random.default_rng(2), 3, cfg)
    with torch.no_grad():
        feats = ref.audio_features(torch.from_numpy(mel))
        out = ref.connector(feats)
    got_feats = model.audio_features(jnp.asarray(mel))
    assert got_feats.shape == (3, cfg.tokens_per_chunk, cfg.audio_feature_dim) == (3, 300, 4 * cfg.whisper.d_model)
    assert rel_err(got_feats, feats.numpy()) <= FP32_TOL
    got = model.encode_audio(jnp.asarray(mel))
    assert got.shape == (3, 300, cfg.qwen3.hidden_size)
    err = rel_err(got, out.numpy())
    print(f"connector output rel err {err:.2e}")
    assert err <= FP32_TOL


@pytest.mark.parametrize("connector_type", ["mlp2x_gelu", "linear", "blp_4i_3x"])
def test_other_connector_types(torch_threads, connector_type):
    cfg = preset("mufun-tiny").replace(connector_type=connector_type)
    ref = TorchMuFun(cfg, seed=3)
    model = jax_mufun_from_torch(ref, cfg)
    x = np.random.default_rng(3).standard_normal((2, 7, cfg.audio_feature_dim)).astype(np.float32)
    with torch.no_grad():
        want = ref.connector(torch.from_numpy(x)).numpy()
    assert rel_err(model.connector(jnp.asarray(x)), want) <= FP32_TOL


@pytest.mark.parametrize("shape", [(1, 128, 2999), (1, 128, 3001), (1, 80, 3000), (128, 3000)])
def test_encoder_rejects_bad_mel_shapes(pair, shape):
    cfg, _, model = pair
    with pytest.raises(ValueError, match=r"3000"):
        model.encoder(jnp.zeros(shape))


def test_taps_must_be_increasing_and_in_range():
    w = WhisperConfig(d_model=64, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=128)
    for taps in [(0, 5), (3, 1, 2, 4), (-1, 0, 1, 2), ()]:
        with pytest.raises(ValueError, match="taps"):
            MuFunConfig(whisper=w, taps=taps, connector_type="linear")
