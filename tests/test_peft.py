"""LoRA runs exported in PEFT's format (``convert_weights.py export-adapter``), checked against the
real ``peft`` library on the PyTorch reference, plus the merged export and our own adapter loader.

One cheap run directory: the tiny model's base weights come from the torch reference (saved as the
run's ``init_from``); the run trains the connector in full and the LLM with LoRA (rank 4). Instead of
training, its adapters get random values (``lora_b`` not zero) and its connector random changes, and
one checkpoint is written with the trainer's own ``run_dir.save_train_state``. fp32 throughout; tolerance
FP32_TOL = 1e-4 x max |reference logit|.
"""

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from conftest import FP32_TOL, rel_err
from helpers import random_mel, small_cfg
from mufun_jax import checkpoint, loading, run_dir, train_lib
from mufun_jax.cli import convert_main
from mufun_jax.config import IMAGE_TOKEN_INDEX as AUDIO
from mufun_jax.convert import torch_to_flax
from mufun_jax.peft_format import PREFIX, load_adapter
from mufun_jax.splice import SpliceSample, collate
from mufun_jax.train_config import TrainConfig
from mufun_jax.testing.torch_reference import TorchMuFun

TRAINABLE = {"whisper": "frozen", "connector": "full", "llm": "lora"}
LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.05}


def forward(model, batch, mel):
    return np.asarray(_fwd(model, batch, mel))


@jax.jit
def _fwd(model, batch, mel):
    return model(batch["input_ids"], mel, batch["audio_slots"], positions=batch["positions"],
                 segment_ids=batch["segment_ids"])[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, torch_threads):
    d = tmp_path_factory.mktemp("peft")
    cfg = small_cfg()
    ref = TorchMuFun(cfg, seed=7)
    base = torch_to_flax(ref.combined_state_dict(), cfg)
    checkpoint.save_model(d / "base", cfg, unflatten_dict(base))
    tcfg = TrainConfig.from_dict(dict(output_dir=str(d / "run"), init_from=str(d / "base"), trainable=TRAINABLE,
                                      lora=LORA, progress=False))
    # Our adapted model, built from shapes (an eager random init of the model takes ~15 s): the base weights,
    # random adapters (lora_b not zero) and a "trained" connector away from the base's.
    rng = np.random.default_rng(0)
    params = {}
    for path, v in flatten_dict(nnx.to_pure_dict(nnx.state(loading.abstract_model(cfg, tcfg.run)))).items():
        if path[-1] in ("lora_a", "lora_b"):
            scale = 1 / np.sqrt(v.shape[-2]) if path[-1] == "lora_a" else 0.2
            params[path] = scale * rng.standard_normal(v.shape).astype(np.float32)
        elif path[0] == "connector":
            params[path] = base[path] + 0.5 * np.std(base[path]) * rng.standard_normal(v.shape).astype(np.float32)
        else:
            params[path] = base[path]
    params = unflatten_dict(params)
    model = build(cfg, tcfg.run, params)
    trainable, _ = train_lib.partition(params, train_lib.trainable_paths(model, tcfg.trainable))
    trainable = jax.tree.map(jnp.asarray, trainable)
    state = {"step": jnp.asarray(5, jnp.int32), "params": trainable,
             "opt_state": train_lib.make_optimizer(tcfg).init(trainable),
             "rng": jax.random.key_data(jax.random.key(0))}
    mngr = run_dir.train_checkpoint_manager(tcfg.output_dir, tcfg.keep)
    run_dir.save_train_state(mngr, 5, state, {"position": 5})
    mngr.wait_until_finished()
    mngr.close()
    (d / "run" / "train_config.json").write_text(json.dumps(tcfg.to_dict()))

    assert convert_main(["export-adapter", str(d / "run"), str(d / "adapter"), "--no-progress"]) == 0
    samples = [SpliceSample([*rng.integers(1, cfg.qwen3.vocab_size, 5), AUDIO,
                             *rng.integers(1, cfg.qwen3.vocab_size, 6)], [1])]
    mel = random_mel(rng, 1, cfg)
    batch = collate(samples, num_chunks=1, tokens_per_chunk=cfg.tokens_per_chunk, max_length=4096,
                    pad_token_id=cfg.pad_token_id)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    return d, cfg, tcfg, ref, model, params, base, samples, mel, batch


def build(cfg, run, params):
    graphdef, state = nnx.split(loading.abstract_model(cfg, run))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def torch_logits(ref, samples, mel):
    with torch.no_grad():
        logits, mask = ref([s.input_ids for s in samples], [[torch.from_numpy(mel)]])
    return logits.numpy(), mask.numpy().astype(bool)


def test_peft_loads_the_adapter_onto_the_torch_reference(setup):
    """peft.PeftModel.from_pretrained on the reference reproduces our adapted model's logits: LoRA on the
    LLM's seven projections only (none on Whisper, whose q/k/v_proj share the names) and the fully trained
    connector as modules_to_save."""
    from peft import PeftModel

    d, cfg, tcfg, ref, model, params, base, samples, mel, batch = setup
    conf = json.loads((d / "adapter" / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and conf["modules_to_save"] == [
        "connector._connector.linear1", "connector._connector.linear2"]
    got = forward(model, batch, mel)
    base_logits, mask = torch_logits(ref, samples, mel)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(ref), str(d / "adapter"))
    adapted = [n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")]
    assert len(adapted) == 7 * cfg.qwen3.num_hidden_layers and all(".language_model." in n for n in adapted)
    want, mask = torch_logits(peft_model, samples, mel)
    err = rel_err(got[mask], want[mask])
    diff = np.abs(got[mask] - want[mask]).max()
    print(f"PEFT adapter vs ours: fp32 logits max abs {diff:.2e}, rel {err:.2e}")
    assert err <= FP32_TOL
    assert rel_err(base_logits[mask], want[mask]) > 100 * FP32_TOL  # the adapter changes the function
    # the connector's full training matters too: ours with the base connector is far from PEFT's
    other = build(cfg, tcfg.run, dict(params, connector=unflatten_dict({k: v for k, v in base.items()
                                                              if k[0] == "connector"})["connector"]))
    assert rel_err(forward(other, batch, mel)[mask], want[mask]) > 100 * FP32_TOL


def test_merged_export_and_our_loader_match_the_adapted_model(setup):
    """--merge writes the released layout (read back by load_model), and load_adapter merges the PEFT
    directory into a plain model (also at load, as ``from_pretrained(adapter=)`` and ``infer.py
    --adapter`` do): all give the adapted model's logits."""
    d, cfg, tcfg, ref, model, params, base, samples, mel, batch = setup
    assert convert_main(["export-adapter", str(d / "run"), str(d / "merged"), "--merge", "--no-progress"]) == 0
    assert json.loads((d / "merged" / "config.json").read_text())["model_type"] == "tinyllava"
    want = forward(model, batch, mel)
    merged = forward(loading.load_model(d / "merged"), batch, mel)
    loaded = forward(load_adapter(loading.load_model(d / "base"), d / "adapter"), batch, mel)
    at_load = forward(loading.load_model(d / "base", adapter=d / "adapter"), batch, mel)  # from_pretrained's path
    for name, got in (("merged export", merged), ("load_adapter", loaded), ("load_model(adapter=)", at_load)):
        print(f"{name} vs adapted: fp32 logits max abs {np.abs(got - want).max():.2e}, rel {rel_err(got, want):.2e}")
        assert rel_err(got, want) <= FP32_TOL
    assert rel_err(forward(loading.load_model(d / "base"), batch, mel), want) > 100 * FP32_TOL


def test_adapter_onto_a_different_base_is_a_clear_error(setup, tmp_path):
    d, cfg, *_ = setup
    other = cfg.replace(qwen3=dataclasses.replace(cfg.qwen3, num_hidden_layers=2))
    with pytest.raises(ValueError, match=r"different base model: qwen3\.num_hidden_layers: adapter 3, model 2"):
        load_adapter(loading.abstract_model(other), d / "adapter")
    # a tensor our model has no parameter for (layer 9 of 3) is named, not skipped
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes((d / "adapter" / "adapter_config.json").read_bytes())
    sd = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    extra = f"{PREFIX}language_model.model.layers.9.self_attn.q_proj.lora_A.weight"
    save_file({**sd, extra: torch.zeros(4, 64)}, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"1 tensors match no parameter.*layers\.9\.self_attn\.q_proj\.lora_A"):
        load_adapter(loading.load_model(d / "base"), bad)


def test_cli_errors(setup, tmp_path, capsys):
    d, cfg, tcfg, *_ = setup

    def fails(run, dst, *flags):
        assert convert_main(["export-adapter", str(run), str(dst), "--no-progress", *flags]) == 2
        return capsys.readouterr().err

    assert "not a training run directory" in fails(tmp_path, tmp_path / "out")
    assert "already exists; pass --overwrite" in fails(d / "run", d / "adapter")
    full = tmp_path / "full"
    full.mkdir()
    (full / "train_config.json").write_text(json.dumps(dict(tcfg.to_dict(), trainable={m: "full" for m in TRAINABLE})))
    assert "trains no module with LoRA" in fails(full, tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train_config.json").write_text(json.dumps(tcfg.to_dict()))
    assert "no committed checkpoint" in fails(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()
