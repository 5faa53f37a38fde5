"""Config construction from HF dicts, the combined MuFun config.json, YAML and presets."""

from pathlib import Path

import pytest
import torch
import transformers
from flax import nnx

from mufun_jax.config import MuFunConfig, Qwen3Config, WhisperConfig, parse_connector_type, preset
from mufun_jax.convert import COMPONENTS, FLAX_ROOT, rules
from mufun_jax.models import MuFun
from mufun_jax.testing.torch_reference import hf_whisper_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The fields that matter, as in openai/whisper-large-v3 and Qwen/Qwen3-8B-Base config.json files.
WHISPER_LARGE_V3 = {
    "model_type": "whisper", "activation_function": "gelu", "d_model": 1280, "encoder_layers": 32,
    "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "decoder_layers": 32, "decoder_attention_heads": 20,
    "decoder_ffn_dim": 5120, "num_mel_bins": 128, "max_source_positions": 1500, "max_target_positions": 448,
    "scale_embedding": False, "vocab_size": 51866,
}
QWEN3_8B_BASE = {
    "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 4096, "intermediate_size": 12288,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 151936, "rope_theta": 1000000, "rope_scaling": None, "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False, "max_position_embeddings": 32768, "hidden_act": "silu", "attention_bias": False,
    "use_sliding_window": False,
}


def tinyllava_config(**over):
    d = {
        "model_type": "tinyllava", "connector_type": "blp_4i_2x", "text_config": QWEN3_8B_BASE,
        "vision_config": WHISPER_LARGE_V3, "hidden_size": 4096, "vocab_size": 151936, "vision_hidden_size": 1280,
        "ignore_index": -100, "image_token_index": -200, "pad_token": "<|endoftext|>", "pad_token_id": 151643,
        "tokenizer_padding_side": "right", "tokenizer_model_max_length": 4096, "tokenizer_use_fast": False,
    }
    d.update(over)
    return d


def test_whisper_from_hf_dict():
    assert WhisperConfig.from_hf(WHISPER_LARGE_V3) == preset("mufun-8b").whisper


def test_qwen3_from_hf_dict_both_rope_styles():
    q = Qwen3Config.from_hf(QWEN3_8B_BASE)
    assert q == Qwen3Config.from_hf({**QWEN3_8B_BASE, "rope_theta": None,
                                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert (q.hidden_size, q.num_key_value_heads, q.rope_theta, q.tie_word_embeddings) == (4096, 8, 1e6, False)


def test_qwen3_to_hf_round_trips_through_transformers():
    q = preset("mufun-tiny").qwen3
    d = q.to_hf()
    d.pop("architectures")
    d.pop("model_type")
    assert Qwen3Config.from_hf(transformers.Qwen3Config(**d).to_dict()) == q


def test_from_tinyllava_matches_preset():
    cfg = MuFunConfig.from_tinyllava(tinyllava_config())
    assert cfg.whisper == preset("mufun-8b").whisper
    assert cfg.qwen3.hidden_size == 4096 and cfg.connector.out_dim == 4096
    assert cfg.connector.in_dim == 5120 and cfg.connector.hidden_dim == 10240
    assert cfg.tokens_per_chunk == 300
    assert MuFunConfig.from_tinyllava(cfg.to_tinyllava()) == cfg


def test_hidden_size_3584_is_rejected():
    with pytest.raises(ValueError, match="3584"):
        MuFunConfig.from_tinyllava(tinyllava_config(hidden_size=3584))


def test_yaml_round_trips_the_presets(tmp_path):
    import yaml

    for name in ("mufun-8b", "mufun-tiny"):
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(preset(name).to_dict()))
        assert MuFunConfig.from_yaml(p) == preset(name)


def test_yaml_preset_with_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  preset: mufun-8b\n  qwen3: {num_hidden_layers: 2}\n  taps: [0, 7, 15, 31]\n")
    cfg = MuFunConfig.from_yaml(p)
    assert (cfg.qwen3.num_hidden_layers, cfg.qwen3.hidden_size, cfg.taps) == (2, 4096, (0, 7, 15, 31))
    assert cfg.whisper == preset("mufun-8b").whisper


def test_run_settings_are_not_architecture(tmp_path, caplog):
    """dtype / remat / attention backend are run settings: never saved with the model, ignored (with
    one info line) when an older directory saved them, refused as model overrides."""
    from mufun_jax.config import RunSettings, resolve_model

    assert not {"dtype", "param_dtype", "remat_policy", "attention_impl"} & set(preset("mufun-tiny").to_dict())
    old = {**preset("mufun-tiny").to_dict(), "dtype": "bfloat16", "attention_impl": "splash"}
    with caplog.at_level("INFO", logger="mufun_jax.config"):
        assert MuFunConfig.from_dict(old) == preset("mufun-tiny")
    assert sum("ignoring run settings" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="run settings"):
        resolve_model("mufun-tiny", {"dtype": "bfloat16"})
    with pytest.raises(ValueError, match="remat_policy='nope'"):
        RunSettings(remat_policy="nope")
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        RunSettings(attention_impl="flash")


@pytest.mark.parametrize("bad", [{"dtypo": "float32"}, {"qwen3": {"hiden_size": 8}}])
def test_unknown_keys_are_errors(bad):
    with pytest.raises(ValueError, match="unknown keys"):
        MuFunConfig.from_dict({**preset("mufun-tiny").to_dict(), **bad} if "qwen3" not in bad else
                              {**preset("mufun-tiny").to_dict(), "qwen3": bad["qwen3"]})


@pytest.mark.parametrize("name", ["blp_4i_2x", "blp_2i_3x", "mlp2x_gelu", "linear"])
def test_connector_types_parse(name):
    assert parse_connector_type(name)[0] in ("blp", "mlp", "linear")


@pytest.mark.parametrize("name", ["blp_4x_2i", "blp_0i_2x", "mlp3x_gelu", "qformer", "", None])
def test_bad_connector_types_name_the_string(name):
    with pytest.raises(ValueError, match=repr(name).replace("(", r"\(")):
        parse_connector_type(name)


def test_blp_input_count_must_match_taps():
    with pytest.raises(ValueError, match="blp_3i_2x"):
        preset("mufun-tiny").replace(connector_type="blp_3i_2x")


@pytest.mark.parametrize("bad", [{"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, {"attention_bias": True},
                                 {"use_sliding_window": True}, {"hidden_act": "gelu"}])
def test_unsupported_qwen3_features_are_errors(bad):
    with pytest.raises(ValueError):
        Qwen3Config.from_hf({**QWEN3_8B_BASE, **bad})


def test_full_size_shapes_match_hf_modules():
    """Every tensor of the real 8B MuFun, built abstractly (nothing allocated), has the shape that
    HF's modules give the same key through the converter's mapping."""
    cfg = preset("mufun-8b")
    model = nnx.eval_shape(lambda: MuFun(cfg, rngs=nnx.Rngs(0)))
    ours = {tuple(str(p) for p in path): tuple(v.shape) for path, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Variable)}
    with torch.device("meta"):
        enc = transformers.models.whisper.modeling_whisper.WhisperEncoder(hf_whisper_config(cfg.whisper))
        d = cfg.qwen3.to_hf()
        d.pop("architectures"), d.pop("model_type")
        lm = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**d))
    torch_shapes = {"whisper": {k: tuple(v.shape) for k, v in enc.state_dict().items()},
                    "qwen3": {k: tuple(v.shape) for k, v in lm.state_dict().items()},
                    "connector": {"_connector.linear1.weight": (10240, 5120), "_connector.linear1.bias": (10240,),
                                  "_connector.linear2.weight": (4096, 10240), "_connector.linear2.bias": (4096,)}}
    n_ours = sum(__import__("math").prod(s) for s in ours.values())
    n_torch = sum(__import__("math").prod(s) for c in torch_shapes.values() for s in c.values())
    for comp in COMPONENTS:
        for rule in rules(cfg, comp):
            shape = ours[(FLAX_ROOT[comp],) + rule.path]
            for i, key in enumerate(rule.torch_keys()):
                t = torch_shapes[comp][key]
                flax_shape = shape if rule.layers is None else shape[1:]
                expect = {"linear": t[::-1], "conv": t[::-1]}.get(rule.kind, t)
                assert flax_shape == expect, (comp, key)
    print(f"mufun-8b parameters: {n_ours:,}")
    assert n_ours == n_torch
