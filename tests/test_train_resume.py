"""Checkpoints and resume, end to end through ``train()`` (in subprocesses where a kill or a notice is
what is tested, in this process otherwise): a run killed with
SIGKILL and restarted logs exactly the losses of an uninterrupted run; a kill in the middle of a
save leaves the previous checkpoint restorable; a NaN stops the run before a checkpoint of it; a
warmup result initialises the full stage; a converted checkpoint initialises training."""

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from helpers import committed, losses, run_config as config, run_train as run, small_cfg


@pytest.fixture(scope="module")
def baseline(trained_run):
    """The uninterrupted run's losses (conftest's session-wide ``trained_run``, trained in process)."""
    return trained_run[1]


def train_here(cfg: dict):
    """train() in this process: for runs whose process boundary is not what the test is about."""
    from mufun_jax import train_lib
    from mufun_jax.train_config import TrainConfig

    result = train_lib.train(TrainConfig.from_dict(cfg))
    assert result["step"] == cfg["max_steps"] and not result.get("preempted"), result
    return result


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_losses(tiny_data, baseline, tmp_path):
    out = tmp_path / "run"
    r = run(config(tiny_data, out), "kill_after_step", 5, expect_ok=False)
    assert r.returncode == -signal.SIGKILL
    assert committed(out) and max(committed(out)) < 6
    first = losses(out)
    assert [s for s, _ in first] == [1, 2, 3, 4, 5]
    run(config(tiny_data, out))
    got = losses(out)
    assert len(got) > 6  # the steps after the restored checkpoint were run (and logged) again
    assert max(s for s, _ in got) == 6
    for step, loss in got:
        assert loss == baseline[step], (step, loss, baseline[step])  # bit-exact on CPU
    assert committed(out)[-1] == 6 and (out / "model" / "mufun_config.json").exists()


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tiny_data, baseline, tmp_path):
    out = tmp_path / "run"
    r = run(config(tiny_data, out, async_checkpointing=False), "kill_in_save", 4, expect_ok=False)
    assert r.returncode == -signal.SIGKILL
    assert committed(out) == [2]  # step 4 was written but never committed
    assert any("tmp" in p.name for p in (out / "checkpoints").iterdir())
    run(config(tiny_data, out))
    got = losses(out)
    assert [s for s, _ in got] == [1, 2, 3, 4, 3, 4, 5, 6]  # resumed from step 2
    for step, loss in got:
        assert loss == baseline[step], (step, loss, baseline[step])
    assert not any("tmp" in p.name for p in (out / "checkpoints").iterdir())


def test_nan_loss_stops_before_a_checkpoint_of_it(tiny_data, tmp_path, monkeypatch):
    """NaN audio in the third batch: the run stops at step 3 with a clear error; checkpoints 1
    and 2 exist, nothing later, and the parameters in them are finite."""
    from mufun_jax import train_lib
    from mufun_jax.train_config import TrainConfig

    real = train_lib.make_loader

    class Poisoned:
        def __init__(self, inner):
            self.inner, self.n = inner, 0

        def __iter__(self):
            return self

        def __next__(self):
            b = next(self.inner)
            self.n += 1
            if self.n == 3:
                b["waves"] = np.full_like(b["waves"], np.nan)
            return b

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(train_lib, "make_loader", lambda *a, **k: Poisoned(real(*a, **k)))
    out = tmp_path / "run"
    cfg = TrainConfig.from_dict(config(tiny_data, out, save_every=1, async_checkpointing=False))
    with pytest.raises(train_lib.NonFiniteLossError, match=r"step 3: loss=nan .*not applied.* last good "
                                                           r"checkpoint is step 2"):
        train_lib.train(cfg)
    assert committed(out) == [1, 2]
    assert not (out / "model").exists()
    state = _restore_params(out, 2)
    assert all(np.isfinite(np.asarray(x)).all() for x in state)


def _restore_params(out, step):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(out) / "checkpoints") as m:
        restored = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    import jax

    return jax.tree.leaves(restored["state"]["params"])


def _model_params(model_dir):
    import jax

    from mufun_jax.checkpoint import load_params

    flat = jax.tree_util.tree_flatten_with_path(load_params(model_dir))[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


@pytest.mark.slow  # cost in the quick tier's 10 minutes; the quick tier keeps a cheaper test of the same module
def test_warmup_result_initialises_the_full_stage(tiny_data, tmp_path):
    import jax

    from mufun_jax.sharding import make_mesh
    from mufun_jax.train_config import TrainConfig
    from mufun_jax.train_lib import Trainer, combine

    warm, full = tmp_path / "warm", tmp_path / "full"
    warm_cfg = config(tiny_data, warm, max_steps=2, trainable={"whisper": "frozen", "connector": "full", "llm": "frozen"})
    train_here(warm_cfg)
    # lr 0 for the one step (a zero optim.lr is a config error): the first step of a linear warmup has lr 0
    train_here(config(tiny_data, full, model={}, init_from=str(warm / "model"), max_steps=1,
                      optim=dict(warmup_ratio=1.0)))
    a, b = _model_params(warm / "model"), _model_params(full / "model")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # lr 0: the full stage starts exactly there
    # and the warmup stage changed only the connector: compare with the same seed's initialisation
    tcfg = TrainConfig.from_dict(warm_cfg)
    tr = Trainer(tcfg, tcfg.model_config(), make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    s = tr.init_state(jax.random.key(tcfg.seed))
    flat = jax.tree_util.tree_flatten_with_path(combine(s["params"], s["frozen"]))[0]
    init = {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}
    assert init.keys() == a.keys()
    changed = {k for k in a if not np.array_equal(a[k], init[k])}
    assert changed and all(k.startswith("['connector']") for k in changed), sorted(changed)


def test_init_from_a_converted_checkpoint(tiny_data, tmp_path, torch_threads):
    """A PyTorch checkpoint -> convert_weights import -> train init_from: the weights arrive intact."""
    from mufun_jax.weights import import_checkpoint
    from mufun_jax.testing.torch_reference import TorchMuFun

    cfg = small_cfg()
    ref = TorchMuFun(cfg, seed=5)
    src = tmp_path / "torch"
    src.mkdir()
    from safetensors.numpy import save_file

    save_file(ref.combined_state_dict(), str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(cfg.to_tinyllava()))
    import_checkpoint(tmp_path / "conv", src, progress=False)
    train_here(config(tiny_data, tmp_path / "out", model={}, init_from=str(tmp_path / "conv"), max_steps=1,
                      optim=dict(warmup_ratio=1.0)))  # lr 0: the first step of a linear warmup
    a, b = _model_params(tmp_path / "conv"), _model_params(tmp_path / "out" / "model")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # one on-disk layout: the converter and training's export write the same files, one zarr3 array per
    # parameter, so either directory loads through every reader
    arrays = lambda d: sorted(str(p.parent.relative_to(d)) for p in (d / "params").rglob("zarr.json"))
    assert arrays(tmp_path / "conv") == arrays(tmp_path / "out" / "model") and len(arrays(tmp_path / "conv")) == len(a)
    # and the trained model exports back to the released layout: the original tensors, bit for bit
    from safetensors.numpy import load_file

    from mufun_jax.weights import export_checkpoint

    export_checkpoint(tmp_path / "out" / "model", tmp_path / "back", progress=False)
    back = {k: v for f in (tmp_path / "back").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    want = ref.combined_state_dict()
    assert back.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_metrics_reach_tensorboard_and_jsonl(trained_run):
    """The baseline run's TensorBoard event file holds the same losses as metrics.jsonl."""
    import struct

    from tensorboardX.proto import event_pb2

    out, baseline = trained_run
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    raw, scalars = events[0].read_bytes(), {}
    i = 0
    while i < len(raw):  # TFRecord framing: length, crc, payload, crc
        (n,) = struct.unpack("<Q", raw[i:i + 8])
        ev = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
        for v in ev.summary.value:
            scalars.setdefault(v.tag, {})[ev.step] = v.simple_value
        i += 12 + n + 4
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "label_tokens"} <= set(scalars)
    assert sorted(scalars["loss"]) == [1, 2, 3, 4, 5, 6]
    for step, loss in baseline.items():
        assert abs(scalars["loss"][step] - loss) <= 1e-6 * abs(loss)  # stored as float32
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"step", "loss", "lr", "grad_norm", "tokens_per_s", "samples"} <= set(r) for r in rows)
    assert (out / "train_config.json").exists() and (out / "model" / "params").is_dir()


def test_the_trained_model_serves_inference(tiny_data, trained_run):
    """train.py's OUTPUT_DIR/model loads with the inference API and answers (greedy, batched)."""
    from mufun_jax import MuFun

    out = trained_run[0]
    model = MuFun.from_pretrained(out / "model", tokenizer=str(tiny_data / "tok"), batch_size=2, max_new_tokens=4)
    answers = model.generate([{"prompt": "<audio>\nHow high is the note?", "audio": str(tiny_data / f"a{i}.npy")}
                              for i in range(3)])
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert answers[1] == model.chat("How high is the note?", str(tiny_data / "a1.npy"), max_new_tokens=4)


def test_mufun_plot_draws_a_run(trained_run, tmp_path):
    """``mufun-plot RUN_DIR`` turns any run's metrics.jsonl into a PNG: written, and a real image."""
    import matplotlib.image

    from mufun_jax.cli import plot_main

    out = trained_run[0]
    png = tmp_path / "loss.png"
    assert plot_main([str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0.01  # not blank
    assert plot_main([str(tmp_path / "nope")]) == 2


@pytest.mark.slow
def test_preemption_notice_saves_the_step_and_resume_loses_nothing(tiny_data, baseline, tmp_path):
    """SIGTERM between checkpoints (save_every=2, the notice after step 3): the run saves step 3,
    waits for the commit and exits with status 75; a second SIGTERM, sent while that checkpoint is
    being finalised, is ignored.
    Restarted, it resumes at step 4: every step is logged exactly once and every loss equals the
    uninterrupted run's."""
    out = tmp_path / "run"
    r = run(config(tiny_data, out), "term_twice_in_save", 3, expect_ok=False)
    assert r.returncode == 75, r.stdout[-2000:] + r.stderr[-4000:]
    assert "PREEMPTED 3" in r.stdout and "checkpoint of step 3 is committed" in r.stderr
    assert committed(out)[-1] == 3  # the checkpoint taken at the notice is the newest
    print("notice to committed checkpoint:", r.stdout.split("PREEMPTED 3")[1].split()[0], "s")
    run(config(tiny_data, out))
    logged = losses(out)
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6]  # no step repeated or skipped
    assert dict(logged) == baseline  # exactly the uninterrupted run's losses
