"""convert_weights.py: import all three PyTorch layouts, export back, bit-exact round trips,
corrupt inputs and atomic outputs (small random checkpoints)."""

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx

from conftest import FP32_TOL, rel_err
from helpers import random_mel
from mufun_jax.config import preset
from mufun_jax.convert import load_params as load_into
from mufun_jax.models import MuFun
from mufun_jax.checkpoint import PARAMS_DIR, iter_layers, load_config, load_params, param_metadata
from mufun_jax.cli import convert_main
from mufun_jax.testing.torch_reference import TorchMuFun, hf_whisper_config

CFG = preset("mufun-tiny")


@pytest.fixture(scope="module")
def ref(torch_threads):
    return TorchMuFun(CFG, seed=11)


def write_combined(ref, folder: Path, shards: int = 2, dtype=torch.float32) -> dict:
    folder.mkdir(parents=True)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in ref.state_dict().items()}
    keys = list(sd)
    if shards == 1:
        safetensors.torch.save_file(sd, folder / "model.safetensors")
    else:
        weight_map = {}
        for i, part in enumerate(np.array_split(np.arange(len(keys)), shards)):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            safetensors.torch.save_file({keys[j]: sd[keys[j]] for j in part}, folder / name)
            weight_map.update({keys[j]: name for j in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(CFG.to_tinyllava()))
    (folder / "vocab.json").write_text('{"a": 0}')
    return sd


def write_components(ref, folder: Path) -> dict:
    """The per-part folders MuFun's own training writes (pytorch_model.bin everywhere)."""
    for sub, module in (("vision_tower", ref.vision_tower._vision_tower), ("connector", ref.connector),
                        ("language_model", ref.language_model)):
        (folder / sub).mkdir(parents=True)
        torch.save(module.state_dict(), folder / sub / "pytorch_model.bin")
        (folder / sub / "config.json").write_text("{}")
    (folder / "config.json").write_text(json.dumps(CFG.to_tinyllava()))
    return {k: v.detach() for k, v in ref.state_dict().items()}


def write_parts(ref, folder: Path):
    """Plain HF checkpoints: a WhisperForConditionalGeneration (decoder included) and a Qwen3ForCausalLM."""
    w = transformers.WhisperForConditionalGeneration(hf_whisper_config(CFG.whisper))
    w.model.encoder.load_state_dict(ref.vision_tower._vision_tower.state_dict())
    w.save_pretrained(folder / "whisper")
    ref.language_model.save_pretrained(folder / "qwen3")


def read_export(folder: Path) -> dict:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(safetensors.torch.load_file(folder / f))
    return out


def cli(*args) -> int:
    return convert_main([*map(str, args), "--no-progress"])


@pytest.mark.parametrize("layout", ["combined-sharded", "combined-single", "combined-bf16", "components"])
def test_round_trip_bit_exact(ref, tmp_path, layout):
    src = tmp_path / "src"
    if layout == "components":
        sd = write_components(ref, src)
    else:
        sd = write_combined(ref, src, shards=1 if layout == "combined-single" else 2,
                            dtype=torch.bfloat16 if layout == "combined-bf16" else torch.float32)
    assert cli("import", src, tmp_path / "conv") == 0
    assert load_config(tmp_path / "conv") == CFG
    assert cli("export", tmp_path / "conv", tmp_path / "back", "--max-shard-gb", 0.001) == 0
    back = read_export(tmp_path / "back")
    assert set(back) == set(sd)
    for k, t in sd.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()  # several shards at this size
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "tinyllava"
    if layout.startswith("combined"):
        assert (tmp_path / "back" / "vocab.json").read_text() == '{"a": 0}'


def test_parts_import_keeps_whisper_and_qwen3_and_seeds_connector(ref, tmp_path):
    write_parts(ref, tmp_path)
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        assert cli("import", "--whisper", tmp_path / "whisper", "--qwen3", tmp_path / "qwen3", "--connector",
                   "blp_4i_2x", "--taps", "0,2,3,4", "--seed", seed, tmp_path / name) == 0
    assert cli("export", tmp_path / "a", tmp_path / "back") == 0
    back = read_export(tmp_path / "back")
    for k, t in ref.state_dict().items():
        if not k.startswith("connector."):
            assert torch.equal(back[k], t), k
    conn = lambda d: load_params(tmp_path / d)["connector"]["linear1"]["kernel"]
    assert np.array_equal(conn("a"), conn("b")) and not np.array_equal(conn("a"), conn("c"))
    assert back["connector._connector.linear1.weight"].shape == (2 * CFG.audio_feature_dim, CFG.audio_feature_dim)


def test_exported_checkpoint_gives_reference_logits(ref, tmp_path):
    """Export is loadable by the PyTorch reference and computes the same function."""
    write_combined(ref, tmp_path / "src")
    assert cli("import", tmp_path / "src", tmp_path / "conv", "--dtype", "float32") == 0
    assert cli("export", tmp_path / "conv", tmp_path / "back") == 0
    fresh = TorchMuFun(CFG, seed=99)
    fresh.load_state_dict(read_export(tmp_path / "back"), strict=True)
    rng = np.random.default_rng(0)
    ids = [[3, 4, -200, 5, 6]]
    audios = [[torch.from_numpy(random_mel(rng, 1, CFG))]]
    with torch.no_grad():
        want, _ = ref(ids, audios)
        got, _ = fresh(ids, audios)
    assert torch.equal(got, want)


def test_imported_weights_run_in_jax(ref, tmp_path, caplog):
    write_combined(ref, tmp_path / "src")
    with caplog.at_level("WARNING"):
        assert cli("import", tmp_path / "src", tmp_path / "conv") == 0
        model = MuFun(load_config(tmp_path / "conv"), rngs=nnx.Rngs(0))
        tree = load_params(tmp_path / "conv")
    # a normal import and load says nothing that reads like corruption (Orbax's OCDBT notices)
    assert not [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    flat = {}

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))
        else:
            flat[path] = np.asarray(node)

    walk(tree, ())
    load_into(model, flat)
    mel = random_mel(np.random.default_rng(1), 1, CFG)
    with torch.no_grad():
        want = ref.encode_images(torch.from_numpy(mel)).numpy()
    assert rel_err(model.encode_audio(mel), want) <= FP32_TOL


def test_dtype_option(ref, tmp_path):
    write_combined(ref, tmp_path / "src")
    assert cli("import", tmp_path / "src", tmp_path / "conv", "--dtype", "bfloat16") == 0
    assert {str(d) for _, d in param_metadata(tmp_path / "conv").values()} == {"bfloat16"}
    assert cli("export", tmp_path / "conv", tmp_path / "back", "--dtype", "float32") == 0
    assert {t.dtype for t in read_export(tmp_path / "back").values()} == {torch.float32}


def no_leftovers(parent: Path, name: str):
    return not any(p.name.startswith((name, f".{name}")) for p in parent.iterdir())


def corrupt_cases(ref, src: Path, case: str) -> str:
    """Damage a combined checkpoint; return a regex the error message must match."""
    if case == "truncated":
        write_combined(ref, src)
        shard = src / "model-00002-of-00002.safetensors"
        shard.write_bytes(shard.read_bytes()[:-100])
        return "model-00002-of-00002.safetensors.*truncated"
    if case == "index-missing-file":
        write_combined(ref, src)
        (src / "model-00002-of-00002.safetensors").unlink()
        return "points at model-00002-of-00002.safetensors, which does not exist"
    if case == "missing-tensor":
        sd = write_combined(ref, src, shards=1)
        sd.pop("language_model.model.layers.2.mlp.down_proj.weight")
        safetensors.torch.save_file(sd, src / "model.safetensors")
        return r"missing.*model\.layers\.2\.mlp\.down_proj\.weight"
    if case == "unexpected-tensor":
        sd = write_combined(ref, src, shards=1)
        sd["language_model.model.layers.7.mlp.down_proj.weight"] = torch.zeros(2)
        safetensors.torch.save_file(sd, src / "model.safetensors")
        return r"unexpected.*layers\.7"
    if case == "bad-shape":
        write_combined(ref, src, shards=1)
        cfg = CFG.to_tinyllava()
        cfg["text_config"]["intermediate_size"] = 96
        (src / "config.json").write_text(json.dumps(cfg))
        return r"gate_proj\.weight.*shape \(128, 64\).*needs \(96, 64\)"
    if case == "bad-dtype":
        sd = write_combined(ref, src, shards=1)
        sd["connector._connector.linear2.bias"] = sd["connector._connector.linear2.bias"].to(torch.int32)
        safetensors.torch.save_file(sd, src / "model.safetensors")
        return r"linear2\.bias.*dtype I32"
    if case == "not-mufun":
        write_combined(ref, src, shards=1)
        (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
        return "model_type='llama' is not a MuFun"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["truncated", "index-missing-file", "missing-tensor", "unexpected-tensor",
                                  "bad-shape", "bad-dtype", "not-mufun"])
def test_corrupt_inputs_fail_cleanly(ref, tmp_path, capsys, case):
    pattern = corrupt_cases(ref, tmp_path / "src", case)
    assert cli("import", tmp_path / "src", tmp_path / "conv") == 2
    err = capsys.readouterr().err
    import re

    assert re.search(pattern, err), err
    assert no_leftovers(tmp_path, "conv")  # atomic: no half-written directory, no temporaries


def test_existing_destination_needs_overwrite(ref, tmp_path, capsys):
    write_combined(ref, tmp_path / "src", shards=1)
    (tmp_path / "conv").mkdir()
    assert cli("import", tmp_path / "src", tmp_path / "conv") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli("import", tmp_path / "src", tmp_path / "conv", "--overwrite") == 0
    assert load_config(tmp_path / "conv") == CFG
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_layer_slices_read_per_layer_and_fallback(ref, tmp_path):
    """Export reads stacked params one layer at a time from the per-leaf zarr3 arrays; a checkpoint
    saved with Orbax defaults (OCDBT) still reads, through the whole-array fallback."""
    import orbax.checkpoint.experimental.v1 as ocp

    write_combined(ref, tmp_path / "src")
    assert cli("import", tmp_path / "src", tmp_path / "conv") == 0
    name = ("language_model", "layers", "mlp", "up_proj", "kernel")
    assert (tmp_path / "conv" / PARAMS_DIR / "state" / ".".join(name) / "zarr.json").exists()
    meta = param_metadata(tmp_path / "conv")
    whole = load_params(tmp_path / "conv")["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    layers = list(iter_layers(tmp_path / "conv", name, meta))
    assert len(layers) == CFG.qwen3.num_hidden_layers
    np.testing.assert_array_equal(np.stack(layers), whole)

    other = tmp_path / "ocdbt"
    other.mkdir()
    ocp.save(other / PARAMS_DIR, {"language_model": {"layers": {"mlp": {"up_proj": {"kernel": np.asarray(whole)}}}}})
    assert not (other / PARAMS_DIR / "state" / ".".join(name) / "zarr.json").exists()
    np.testing.assert_array_equal(np.stack(list(iter_layers(other, name, param_metadata(other)))), whole)
