"""The state-dict mapping in both directions (in memory; file formats come with the converter)."""

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mufun_jax.config import preset
from mufun_jax.convert import flax_to_torch, get_params, load_params, torch_to_flax
from mufun_jax.models import MuFun
from mufun_jax.testing.torch_reference import TorchMuFun, hf_whisper_config, randomize_


@pytest.fixture(scope="module")
def ref(torch_threads):
    return TorchMuFun(preset("mufun-tiny"), seed=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(ref, dtype):
    cfg = preset("mufun-tiny")
    sd = {k: v.to(dtype) for k, v in ref.state_dict().items()}
    back = flax_to_torch(torch_to_flax(sd, cfg), cfg)
    assert set(back) == set(sd)
    for k, t in sd.items():
        b = torch.from_numpy(back[k].view(np.int16)).view(torch.bfloat16) if dtype == torch.bfloat16 else \
            torch.from_numpy(back[k])
        assert b.dtype == t.dtype and b.shape == t.shape, k
        assert torch.equal(b, t), k


def test_through_the_nnx_module_is_exact(ref):
    cfg = preset("mufun-tiny")
    sd = ref.combined_state_dict()
    model = MuFun(cfg, rngs=nnx.Rngs(0))
    load_params(model, torch_to_flax(sd, cfg))
    back = flax_to_torch(get_params(model), cfg)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


@pytest.mark.parametrize("wrapper", ["WhisperForConditionalGeneration", "WhisperModel", "WhisperEncoder"])
def test_whisper_component_layouts(ref, wrapper):
    """Plain HF Whisper checkpoints (any wrapper) import to the same encoder params; the decoder is dropped."""
    cfg = preset("mufun-tiny")
    hf_cfg = hf_whisper_config(cfg.whisper)
    cls = getattr(transformers, wrapper, None) or transformers.models.whisper.modeling_whisper.WhisperEncoder
    m = randomize_(cls(hf_cfg), 9)
    enc = m if wrapper == "WhisperEncoder" else m.get_encoder()
    enc_sd = {k: v.detach().numpy() for k, v in enc.state_dict().items()}
    got = torch_to_flax({k: v.detach().numpy() for k, v in m.state_dict().items()}, cfg, component="whisper")
    want = torch_to_flax(enc_sd, cfg, component="whisper")
    assert set(got) == set(want)
    for p in got:
        np.testing.assert_array_equal(got[p], want[p])
    back = flax_to_torch(got, cfg, component="whisper")
    assert set(back) == set(enc_sd)


def test_missing_and_unexpected_keys_are_named(ref):
    cfg = preset("mufun-tiny")
    sd = ref.combined_state_dict()
    missing = dict(sd)
    missing.pop("language_model.model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        torch_to_flax(missing, cfg)
    extra = {**sd, "language_model.model.layers.9.mlp.up_proj.weight": np.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected.*layers\.9"):
        torch_to_flax(extra, cfg)
    with pytest.raises(ValueError, match="mm_projector"):
        torch_to_flax({**sd, "mm_projector.weight": np.zeros(1)}, cfg)


def test_wrong_connector_type_is_caught(ref):
    cfg = preset("mufun-tiny").replace(connector_type="mlp2x_gelu")
    with pytest.raises(ValueError, match="connector"):
        torch_to_flax(ref.combined_state_dict(), cfg)


def test_load_params_checks_shapes(ref):
    cfg = preset("mufun-tiny")
    params = torch_to_flax(ref.combined_state_dict(), cfg)
    params[("connector", "linear1", "kernel")] = params[("connector", "linear1", "kernel")][:, :-1]
    with pytest.raises(ValueError, match=r"connector\.linear1\.kernel"):
        load_params(MuFun(cfg, rngs=nnx.Rngs(0)), params)
