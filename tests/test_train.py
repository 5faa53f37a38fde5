"""The training step: loss semantics against HF's loss on the reference model, gradient
accumulation, the chunked loss, frozen modules, and the config / CLI plumbing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import rel_err
from helpers import CFG, jax_mufun_from_torch, make_samples, one_device_mesh, train_cfg
from mufun_jax import audio
from mufun_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX as AUDIO
from mufun_jax.data.packing import PackConfig, pack_batches
from mufun_jax.splice import expand_placeholders
from mufun_jax.train_config import TrainConfig
from mufun_jax.loss import fused_nll_sums, loss_sums, nll_sums, next_token_targets
from mufun_jax.train_lib import Trainer
from mufun_jax.testing.torch_reference import TorchMuFun

def as_jnp(batch):
    return {k: jnp.asarray(v) for k, v in batch.items() if k != "sample_ids"}


# -- loss ------------------------------------------------------------------------------------------


def test_packed_loss_equals_hf_loss_on_the_reference(torch_threads):
    """Our loss on a packed micro-batch == HF's loss (mean over non -100 labels) on the same
    samples right-padded one per row, through the PyTorch reference model."""
    rng = np.random.default_rng(0)
    ref = TorchMuFun(CFG, seed=3)
    model = jax_mufun_from_torch(ref, CFG)
    samples = make_samples(rng, 4)
    batch = next(pack_batches(samples, PackConfig(batch_size=2, seq_len=700, max_chunks=4)))
    assert len(batch["sample_ids"]) == 4 and batch["segment_ids"].max() == 2  # two samples per row
    s, n = jax.jit(loss_sums)(model, as_jnp(batch))
    rows_ids, rows_lab, audios = [], [], []
    for smp in samples:
        mel = np.asarray(audio.log_mel_spectrogram(audio.pad_chunks(smp.chunks[0])))
        audios.append([torch.from_numpy(np.array(mel))])
        rows_ids.append(smp.input_ids)
        rows_lab.append(expand_placeholders(smp.input_ids, [1], tokens_per_chunk=300, labels=smp.labels)[1])
    with torch.no_grad():
        embeds, mask, pos = ref.splice(rows_ids, audios, 4096)
        labels = torch.full(mask.shape, IGNORE_INDEX)
        for i, lab in enumerate(rows_lab):
            labels[i, :len(lab)] = torch.from_numpy(lab.astype(np.int64))
        want = ref.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, labels=labels).loss
    assert int(n) == sum(len(x) - 1 for x in rows_lab) - sum(np.sum(x[1:] == IGNORE_INDEX) for x in rows_lab)
    assert abs(float(s / n) - float(want)) <= 1e-5 * float(want), (float(s / n), float(want))


def test_targets_never_cross_samples():
    labels = jnp.array([[1, 2, 3, 4, 5, 6]])
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    np.testing.assert_array_equal(next_token_targets(labels, seg), [[2, 3, -100, 5, -100, -100]])


def test_chunked_loss_equals_full_loss_and_gradients():
    model = jax_mufun_from_torch(TorchMuFun(CFG, seed=1), CFG)
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.standard_normal((2, 37, CFG.qwen3.hidden_size)), jnp.float32)
    t = jnp.asarray(np.where(rng.random((2, 37)) < 0.3, IGNORE_INDEX, rng.integers(0, 512, (2, 37))))
    full = jax.value_and_grad(lambda h: nll_sums(model.logits, h, t)[0])(h)
    chunked = jax.value_and_grad(lambda h: nll_sums(model.logits, h, t, chunk=8)[0])(h)
    assert rel_err(chunked[0], full[0]) < 1e-6
    assert rel_err(chunked[1], full[1]) < 1e-5
    assert float(nll_sums(model.logits, h, t, chunk=8)[1]) == float(jnp.sum(t != IGNORE_INDEX))


@pytest.mark.parametrize("chunk", [0, 8])
def test_fused_loss_equals_plain_cross_entropy_and_its_gradients(chunk):
    """The fused loss takes its gradients in the forward pass; value and gradients (hidden states
    and head) must equal autodiff of a plain log-softmax cross-entropy. fp32, tolerance 1e-5."""
    rng = np.random.default_rng(4)
    d, vocab = 24, 97
    h = jnp.asarray(rng.standard_normal((3, 29, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d, vocab)) / 5, jnp.float32)
    t = jnp.asarray(np.where(rng.random((3, 29)) < 0.3, IGNORE_INDEX, rng.integers(0, vocab, (3, 29))))

    def plain(w, h):
        logp = jax.nn.log_softmax(h @ w, axis=-1)
        gold = jnp.take_along_axis(logp, jnp.maximum(t, 0)[..., None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(t != IGNORE_INDEX, gold, 0.0))

    want, (gw, gh) = jax.value_and_grad(plain, argnums=(0, 1))(w, h)
    got, (fw, fh) = jax.value_and_grad(lambda w, h: 2.0 * fused_nll_sums(w, h, t, chunk)[0], argnums=(0, 1))(w, h)
    assert rel_err(got, 2 * want) < 1e-6  # the factor 2 checks that the cotangent scales the gradients
    assert rel_err(fw, 2 * gw) < 1e-5 and rel_err(fh, 2 * gh) < 1e-5
    s, n = jax.jit(fused_nll_sums, static_argnums=3)(w, h, t, chunk)  # no gradient: the plain scan
    assert rel_err(s, want) < 1e-6 and float(n) == float(jnp.sum(t != IGNORE_INDEX))


@pytest.mark.parametrize("tied", [False, True])
def test_head_matrix_gives_the_models_logits(tied):
    import dataclasses

    cfg = dataclasses.replace(CFG, qwen3=dataclasses.replace(CFG.qwen3, tie_word_embeddings=tied))
    from mufun_jax.models import MuFun
    from flax import nnx

    model = MuFun(cfg, rngs=nnx.Rngs(0))
    h = jnp.asarray(np.random.default_rng(5).standard_normal((2, 5, cfg.qwen3.hidden_size)), jnp.float32)
    assert rel_err(h @ model.head_matrix(), model.logits(h)) < 1e-6


def test_fused_loss_runs_three_vocabulary_matmuls_not_four():
    """The gradient of the chunked loss needs the logits, d hidden and d head. ``nll_sums`` asks
    for the logits twice (forward and remat; XLA on TPU keeps both, see docs/tpu.md), the fused
    loss once. Counted in the differentiated program, before XLA."""
    d, vocab = 16, 101
    h, w, t = jnp.zeros((2, 24, d)), jnp.zeros((d, vocab)), jnp.zeros((2, 24), jnp.int32)

    def vocab_dots(f):
        def walk(jaxpr):
            n = 0
            for eqn in jaxpr.eqns:
                shapes = [v.aval.shape for v in (*eqn.invars, *eqn.outvars) if hasattr(v.aval, "shape")]
                n += eqn.primitive.name == "dot_general" and any(vocab in s for s in shapes)
                n += sum(walk(j.jaxpr if hasattr(j, "jaxpr") else j) for j in jax.extend.core.jaxprs_in_params(eqn.params))
            return n
        return walk(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(w, h).jaxpr)

    assert vocab_dots(lambda w, h: fused_nll_sums(w, h, t, 16)[0]) == 3
    assert vocab_dots(lambda w, h: nll_sums(lambda x: x @ w, h, t, 16)[0]) == 4
    # a frozen head (LoRA, the warmup stage): XLA drops the unused head gradient's matmul
    from mufun_jax import aot

    frozen = jax.jit(jax.grad(lambda h: fused_nll_sums(w, h, t, 16)[0])).lower(h).compile()
    assert aot.hlo_flops(frozen.as_text()).flops == 2 * (2 * 2 * 24 * d * vocab)


# -- steps -----------------------------------------------------------------------------------------


@pytest.mark.slow  # cost in the quick tier's 10 minutes; the quick tier keeps a cheaper test of the same module
def test_grad_accumulation_equals_one_big_batch():
    """Two micro-batches of 2 rows accumulated == one micro-batch of the same 4 rows."""
    rng = np.random.default_rng(2)
    samples = make_samples(rng, 4)
    small = list(pack_batches(samples, PackConfig(batch_size=2, seq_len=400, max_chunks=2)))
    big = next(pack_batches(samples, PackConfig(batch_size=4, seq_len=400, max_chunks=4)))
    assert len(small) == 2 and len(big["sample_ids"]) == 4
    mesh = one_device_mesh()
    t_acc = Trainer(train_cfg(optim=dict(lr=1e-3, warmup_ratio=0.0, grad_accum=2)), CFG, mesh)
    t_one = Trainer(train_cfg(optim=dict(lr=1e-3, warmup_ratio=0.0)), CFG, mesh)
    key = jax.random.key(0)
    s_acc, m_acc = t_acc.train_step(t_acc.init_state(key), t_acc.global_batch(small))
    s_one, m_one = t_one.train_step(t_one.init_state(key), t_one.global_batch([big]))
    assert float(m_acc["label_tokens"]) == float(m_one["label_tokens"]) > 0
    assert rel_err(m_acc["loss"], m_one["loss"]) < 1e-6
    assert rel_err(m_acc["grad_norm"], m_one["grad_norm"]) < 1e-5
    # Adam's first update is lr * g / (|g| + eps): where |g| ~ eps, fp32 rounding of g shows. 1% of lr.
    for a, b in zip(jax.tree.leaves(s_acc["params"]), jax.tree.leaves(s_one["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_frozen_modules_stay_identical_and_have_no_optimizer_state():
    rng = np.random.default_rng(3)
    batches = list(pack_batches(make_samples(rng, 8), PackConfig(batch_size=2, seq_len=700, max_chunks=4)))
    cfg = train_cfg(trainable={"whisper": "frozen", "connector": "full", "llm": "frozen"})
    tr = Trainer(cfg, CFG, one_device_mesh())
    state = tr.init_state(jax.random.key(0))
    frozen0 = jax.tree.map(np.asarray, state["frozen"])
    train0 = jax.tree.map(np.asarray, state["params"])
    assert set(state["params"]) == {"connector"}
    assert set(state["frozen"]) == {"encoder", "language_model"}
    n_conn = sum(x.size for x in jax.tree.leaves(train0))
    opt_arrays = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
    assert sum(x.size for x in opt_arrays) == 2 * n_conn  # Adam's mu and nu, for the connector only
    for b in batches[:2]:
        state, m = tr.train_step(state, tr.global_batch([b]))
        assert np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(state["frozen"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(train0),
                                                                        jax.tree.leaves(state["params"])))


def test_frozen_step_skips_their_weight_gradients():
    """The compiled warmup step (connector only) does far fewer FLOPs than the full step."""
    mesh = one_device_mesh()
    flops = {}
    for name, trainable in [("warmup", {"whisper": "frozen", "connector": "full", "llm": "frozen"}),
                            ("full", {"whisper": "full", "connector": "full", "llm": "full"})]:
        tr = Trainer(train_cfg(trainable=trainable), CFG, mesh)
        batch = {k: jax.ShapeDtypeStruct((1,) + v.shape, v.dtype, sharding=tr.batch_sharding)
                 for k, v in next(pack_batches(make_samples(np.random.default_rng(0), 2),
                                               PackConfig(batch_size=2, seq_len=640, max_chunks=4))).items()
                 if k != "sample_ids"}
        cost = tr.train_step.lower(tr.abstract_state(), batch).compile().cost_analysis()
        flops[name] = float(cost["flops"])
    assert flops["warmup"] < 0.75 * flops["full"], flops


def test_nonfinite_update_is_not_applied():
    rng = np.random.default_rng(4)
    batch = next(pack_batches(make_samples(rng, 2), PackConfig(batch_size=2, seq_len=640, max_chunks=4)))
    batch["waves"][0, :100] = np.nan
    tr = Trainer(train_cfg(), CFG, one_device_mesh())
    state = tr.init_state(jax.random.key(0))
    before = jax.tree.map(np.asarray, state["params"])
    state, m = tr.train_step(state, tr.global_batch([batch]))
    assert not np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, np.asarray(b))


# -- config ----------------------------------------------------------------------------------------


def test_config_overrides_and_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {preset: mufun-tiny}\noptim:\n  lr: 2e-5\ndata:\n  batch_size: 4\n")
    cfg = TrainConfig.load(p, ["optim.lr=1e-4", "data.seq_len=512", "trainable.whisper=frozen", "mesh.fsdp=-1"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert TrainConfig.load(p).optim.lr == 2e-5  # YAML reads 2e-5 as a string; we do not
    assert cfg.data.seq_len == 512 and cfg.data.batch_size == 4 and cfg.trainable["whisper"] == "frozen"
    assert cfg.model_config().qwen3.hidden_size == 64
    with pytest.raises(ValueError, match="unknown keys in optim: \\['lrr'\\]"):
        TrainConfig.load(p, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="key=value"):
        TrainConfig.load(p, ["optim.lr"])
    with pytest.raises(ValueError, match="nothing to train"):
        TrainConfig.load(p, ["trainable.whisper=frozen", "trainable.connector=frozen", "trainable.llm=frozen"])
    with pytest.raises(ValueError, match="optim.lr='fast' must be a number"):
        TrainConfig.load(p, ["optim.lr=fast"])
    with pytest.raises(ValueError, match="data.batch_size=0"):
        TrainConfig.load(p, ["data.batch_size=0"])


@pytest.mark.parametrize("name", ["demo", "mufun8b_warmup", "mufun8b_full", "mufun8b_finetune"])
def test_shipped_configs_parse(name):
    from pathlib import Path

    cfg = TrainConfig.load(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    if name.startswith("mufun8b"):
        assert cfg.optim.lr == 2e-5 and cfg.optim.schedule == "cosine" and cfg.optim.warmup_ratio == 0.03
        assert cfg.optim.weight_decay == 0.0 and cfg.data.seq_len == 4096
        assert cfg.data.batch_size * cfg.optim.grad_accum == (384 if name != "mufun8b_finetune" else 192)
        assert cfg.dtype == "bfloat16" and cfg.remat_policy == "full" and cfg.init_from
        warm = name == "mufun8b_warmup"
        assert cfg.trainable == ({"whisper": "frozen", "connector": "full", "llm": "frozen"} if warm
                                 else {"whisper": "full", "connector": "full", "llm": "full"})
        assert cfg.data.template == ("pretrain" if warm else "qwen2_instruct")


@pytest.mark.slow  # cost in the quick tier's 10 minutes; the quick tier keeps a cheaper test of the same module
def test_pool_stride_10_packs_its_own_audio_slots_and_trains(tmp_path):
    """The packer takes tokens_per_chunk from the model config: a model with AvgPool stride 10 (150
    audio tokens per 30 s chunk) gets each audio in its own slots, so its packed logits equal its
    one-sample-per-row logits; and train() runs on it."""
    from flax import nnx

    from helpers import SMALL_MODEL, tiny_train_data
    from mufun_jax.data.dataset import dataset_tokenizer
    from mufun_jax.models import MuFun
    from mufun_jax.train_lib import make_loader, train

    data = tiny_train_data(tmp_path, n=8)
    base = dict(output_dir=str(tmp_path / "run"), model={**SMALL_MODEL, "pool_stride": 10}, max_steps=2,
                progress=False, data=dict(dataset=str(data / "train.json"), tokenizer=str(data / "tok"),
                                          batch_size=2, seq_len=1024, max_chunks=4, shuffle=False))
    cfg = TrainConfig.from_dict(base)
    assert cfg.model.tokens_per_chunk == 150
    tok = dataset_tokenizer(data / "tok")
    mesh = one_device_mesh()
    packed = next(make_loader(cfg, cfg.model, tok, mesh))
    single = TrainConfig.from_dict({**base, "data": {**base["data"], "pack": False, "batch_size": 8,
                                                     "max_chunks": 8}})
    rows = next(make_loader(single, single.model, tok, mesh))
    assert packed["segment_ids"].max() >= 2  # several samples share a row
    model = MuFun(cfg.model, rngs=nnx.Rngs(0))
    fwd = jax.jit(lambda m, b: m(b["input_ids"], b["waves"], b["audio_slots"], positions=b["positions"],
                                 segment_ids=b["segment_ids"])[0])
    got, want = np.asarray(fwd(model, as_jnp(packed))), np.asarray(fwd(model, as_jnp(rows)))

    def per_sample(batch):
        out, ids = {}, iter(batch["sample_ids"])
        for r in range(batch["segment_ids"].shape[0]):
            for k in range(1, batch["segment_ids"][r].max() + 1):
                out[next(ids)] = (r, batch["segment_ids"][r] == k)
        return out

    mine, theirs = per_sample(packed), per_sample(rows)
    for sid, (r, where) in mine.items():
        r2, where2 = theirs[sid]
        assert (packed["audio_slots"][r][where] >= 0).sum() == 150  # one 1-2 s clip: one chunk, 150 slots
        assert rel_err(got[r][where], want[r2][where2]) < 1e-5, sid
    result = train(cfg)
    assert result["step"] == 2 and np.isfinite(result["loss"])


@pytest.mark.slow  # cost in the quick tier's 10 minutes; the quick tier keeps a cheaper test of the same module
def test_model_trained_with_the_tpu_kernel_serves_on_cpu(tmp_path):
    """Run settings are not saved with the weights: a model trained with attention_impl
    splash_interpret exports a config without it, and loads and answers on CPU with the default
    (auto: xla here) backend."""
    import json

    import mufun_jax
    from helpers import SMALL_MODEL, tiny_train_data
    from mufun_jax.train_lib import train

    data = tiny_train_data(tmp_path, n=4)
    cfg = TrainConfig.from_dict(dict(
        output_dir=str(tmp_path / "run"), model=SMALL_MODEL, max_steps=1, progress=False,
        attention_impl="splash_interpret", dtype="float32",
        data=dict(dataset=str(data / "train.json"), tokenizer=str(data / "tok"), batch_size=2, seq_len=512,
                  max_chunks=2)))
    train(cfg)
    saved = json.loads((tmp_path / "run" / "model" / "mufun_config.json").read_text())
    assert not {"attention_impl", "dtype", "param_dtype", "remat_policy"} & set(saved)
    model = mufun_jax.MuFun.from_pretrained(tmp_path / "run" / "model", max_new_tokens=4, batch_size=2)
    assert model.model.run.attention_impl == "auto" and model.model.run.dtype == "float32"
    out = model.generate([{"prompt": "How high is the note?", "audio": str(data / "a0.npy")}],
                         return_details=True)[0]
    assert out.error is None and 1 <= len(out.token_ids) <= 4
    # a directory written before run settings moved out still loads; its saved run settings are ignored
    (tmp_path / "run" / "model" / "mufun_config.json").write_text(json.dumps(
        {**saved, "attention_impl": "splash_interpret", "dtype": "bfloat16", "remat_policy": "full"}))
    old = mufun_jax.MuFun.from_pretrained(tmp_path / "run" / "model", max_new_tokens=4, batch_size=2)
    assert old.model.run == model.model.run
