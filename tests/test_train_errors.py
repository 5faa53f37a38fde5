"""Bad input to the training, data, convert and plot CLIs, as a table: every row is a command, the
exit status it must end with, a fragment of its one-line message, the files it must leave
byte-for-byte unchanged and the paths it must not create. A user's work is never lost and an
expected failure is one line, with exit status 2 (a traceback only with --debug).

The rows share two tiny training runs (module fixtures): one with the LLM frozen, trained
in-process, and one with the LLM trained, run as ``python train.py`` in a subprocess with a
progress bar and an eval set (the log lines under the bar are only visible across a process
boundary: in-process, pytest captures logging itself).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import SMALL_MODEL, small_cfg, tiny_train_data
from mufun_jax import cli, infer_cli
from mufun_jax.data.__main__ import main as data_main

ROOT = Path(__file__).resolve().parents[1]
MAINS = {"train": cli.train_main, "data": data_main, "convert": cli.convert_main, "plot": cli.plot_main,
         "infer": infer_cli.infer_main}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tiny_train_data(tmp_path_factory.mktemp("data"))
    cfg = dict(model=dict(SMALL_MODEL), max_steps=1, save_every=1, keep=3, seed=0, progress=False,
               trainable=dict(whisper="full", connector="full", llm="frozen"),
               optim=dict(lr=1e-3, warmup_ratio=0.0),
               data=dict(dataset=str(d / "train.json"), tokenizer=str(d / "tok"), batch_size=2, seq_len=512,
                         max_chunks=2))
    (d / "c.yaml").write_text(yaml.safe_dump(cfg))
    return d


@pytest.fixture(scope="module")
def frozen(data, tmp_path_factory):
    """A finished one-step run with the LLM frozen (as the config says), trained in-process."""
    out = tmp_path_factory.mktemp("runs") / "frozen"
    assert cli.train_main(["--config", str(data / "c.yaml"), f"output_dir={out}"]) == 0
    return out


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A finished one-step run with the LLM trained, as ``python train.py`` with a progress bar and
    an eval set; returns (its output_dir, its stderr)."""
    out = tmp_path_factory.mktemp("runs") / "trained"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(data / "c.yaml"), f"output_dir={out}",
                        "trainable.llm=full", "progress=true", f"data.eval_dataset={data / 'eval.json'}",
                        "eval_batches=1"], capture_output=True, text=True, env=env, cwd=data, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stderr


# -- setups of rows that need a file made first ------------------------------------------------------


def _file(tmp: Path) -> None:  # a regular file where output_dir needs a directory (fails as root too)
    (tmp / "afile").write_text("not a directory")


def _bad_yaml(tmp: Path) -> None:
    (tmp / "bad.yaml").write_text("max_steps: [1\n")


def _all_bad(tmp: Path, data: Path) -> None:
    records = json.loads((data / "train.json").read_text())
    for r in records:
        r["audio"] = "missing_" + r["audio"]
    (tmp / "allbad.json").write_text(json.dumps(records))


def _empty_dir(tmp: Path) -> None:
    (tmp / "emptydir").mkdir()


def _hf_dir(tmp: Path, name: str) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(small_cfg().to_tinyllava()))
    return d


def _random_bytes(tmp: Path) -> None:
    (_hf_dir(tmp, "rnd") / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))


def _truncated(tmp: Path) -> None:
    from safetensors.numpy import save_file

    shard = _hf_dir(tmp, "trunc") / "model.safetensors"
    save_file({"a": np.zeros((64, 64), np.float32), "b": np.ones(100, np.float32)}, str(shard))
    shard.write_bytes(shard.read_bytes()[:-1000])


def _nonempty(tmp: Path) -> None:
    (tmp / "nonempty").mkdir()
    (tmp / "nonempty" / "keep.txt").write_text("the user's file")


def _empty_metrics(tmp: Path) -> None:
    (tmp / "emptyrun").mkdir()
    (tmp / "emptyrun" / "metrics.jsonl").write_text("")


SETUPS = {"file": _file, "bad_yaml": _bad_yaml, "all_bad": _all_bad, "empty_dir": _empty_dir,
          "random_bytes": _random_bytes, "truncated": _truncated, "nonempty": _nonempty,
          "empty_metrics": _empty_metrics}


@dataclasses.dataclass
class Row:
    cli: str  # a key of MAINS
    argv: list  # "{data}", "{frozen}", "{trained}", "{tmp}" are filled in
    rc: int
    message: str  # a fragment of stdout + stderr (a regex when it starts with "re:")
    unchanged: tuple = ()  # files or directories whose every byte must stay the same
    absent: tuple = ()  # paths that must not exist afterwards
    setup: str | None = None  # a key of SETUPS
    argv0: str | None = None  # the program name the process was started as
    not_in: str | None = None  # a fragment that must not appear


TRAIN = ["--config", "{data}/c.yaml"]
OUT = "output_dir={tmp}/out"
LAYERS4 = "model.qwen3.num_hidden_layers=4"
SAVED3 = "model.qwen3.num_hidden_layers: saved 3, now 4"

ROWS = [
    # 5: resuming checkpoints of another model or trainable set is refused before anything is written
    pytest.param(Row("train", TRAIN + ["output_dir={frozen}", "max_steps=2", LAYERS4], 2, SAVED3,
                     unchanged=("{frozen}",)), id="5-resume-llm-frozen-other-architecture"),
    pytest.param(Row("train", TRAIN + ["output_dir={trained}", "trainable.llm=full", "max_steps=2", LAYERS4], 2,
                     SAVED3, unchanged=("{trained}",)), id="5-resume-llm-trained-other-architecture",
                 marks=pytest.mark.slow),  # its run is a train.py subprocess; the frozen row covers the quick tier
    pytest.param(Row("train", TRAIN + ["output_dir={frozen}", "max_steps=2", "trainable.llm=full"], 2,
                     "trainable.llm: saved frozen, now full", unchanged=("{frozen}",)),
                 id="5-resume-other-trainable-set"),
    pytest.param(Row("train", TRAIN + ["output_dir={frozen}", "max_steps=2", LAYERS4], 2,
                     "pass --force to resume", unchanged=("{frozen}",)), id="5-message-names-the-way-out"),
    pytest.param(Row("train", TRAIN + ["output_dir={trained}", "trainable.llm=full", "max_steps=2", LAYERS4,
                                       "--force"], 2, "re:checkpoints/1: does not fit this config's train state",
                     unchanged=("{trained}",)), id="5-force-that-cannot-restore-changes-nothing", marks=pytest.mark.slow),
    # 6: impossible values
    *[pytest.param(Row("train", TRAIN + [OUT, kv], 2, msg, absent=("{tmp}/out",)), id=f"6-{kv}") for kv, msg in [
        ("optim.lr=-1e-3", "optim.lr=-0.001: allowed a number > 0"),
        ("optim.lr=0", "optim.lr=0.0: allowed a number > 0"),
        ("optim.warmup_ratio=1.5", "optim.warmup_ratio=1.5: allowed a number in [0, 1]"),
        ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1: allowed a number >= 0"),
        ("data.batch_size=0", "data.batch_size=0: allowed a positive integer"),
        ("max_steps=0", "max_steps=0: allowed a positive integer"),
        ("optim.b2=1.5", "optim.b2=1.5: allowed a number in [0, 1)"),
        ("mesh.fsdp=0", "mesh.fsdp=0: allowed a positive integer, or -1"),
    ]],
    # 8: expected failures are one line with status 2
    pytest.param(Row("train", TRAIN + ["output_dir={tmp}/afile/sub"], 2, "afile/sub: Not a directory",
                     unchanged=("{tmp}/afile",), setup="file"), id="8-output-dir-not-writable"),
    pytest.param(Row("train", ["--config", "{tmp}/bad.yaml", OUT], 2,
                     "bad.yaml: not valid YAML: while parsing a flow sequence", absent=("{tmp}/out",),
                     setup="bad_yaml"), id="8-malformed-yaml"),
    pytest.param(Row("data", ["validate", "{tmp}/nonexistent.json"], 2, "nonexistent.json: No such file or directory"),
                 id="8-validate-missing-dataset"),
    pytest.param(Row("data", ["validate", "{data}/train.json", "--tokenizer", "{tmp}/nope/"], 2,
                     "nope/: no such directory (expected a tokenizer", not_in="Repo id"),
                 id="8-validate-missing-tokenizer"),
    pytest.param(Row("train", TRAIN + [OUT, "data.tokenizer={tmp}/nope/"], 2, "nope/: no such directory",
                     absent=("{tmp}/out",)), id="8-train-missing-tokenizer"),
    # 9: validate resolves audio like training (cwd is elsewhere) and fails when nothing is usable
    pytest.param(Row("data", ["validate", "{data}/train.json", "--no-progress"], 0, "good samples: 24"),
                 id="9-validate-resolves-audio-like-training"),
    pytest.param(Row("data", ["validate", "{tmp}/allbad.json", "--no-progress"], 1, "no usable sample",
                     unchanged=("{tmp}/allbad.json",), setup="all_bad"), id="9-validate-nothing-usable"),
    # 10
    pytest.param(Row("train", TRAIN + [OUT, "data.dataset={tmp}/nope.json"], 2,
                     "nope.json: no such file (data.dataset)", absent=("{tmp}/out",)),
                 id="10-missing-dataset-writes-nothing"),
    pytest.param(Row("plot", ["{tmp}/emptyrun"], 2, "metrics.jsonl: no loss values to plot",
                     unchanged=("{tmp}/emptyrun/metrics.jsonl",), absent=("{tmp}/emptyrun/loss.png",),
                     setup="empty_metrics"), id="10-plot-empty-metrics"),
    *[pytest.param(Row(c, ["--help"], 0, f"usage: {name} ", argv0=f"/somewhere/bin/{name}"), id=f"10-prog-{name}")
      for c, name in [("train", "mufun-train"), ("train", "train.py"), ("convert", "mufun-convert"),
                      ("infer", "mufun-infer"), ("plot", "mufun-plot")]],
    pytest.param(Row("data", ["--help"], 0, "python -m mufun_jax.data validate DATASET", not_in="``"),
                 id="10-data-help-plain-text"),
    pytest.param(Row("data", ["validate", "--help"], 0, "--no-progress", not_in="--quiet"),
                 id="10-validate-no-progress-quiet-hidden"),
    pytest.param(Row("train", ["--help"], 0, "--no-progress"), id="10-train-has-no-progress"),
    pytest.param(Row("train", TRAIN + [OUT, "--no-progress", "optim.lr=-1"], 2, "optim.lr=-1.0",
                     absent=("{tmp}/out",)), id="10-train-no-progress-parses"),
    pytest.param(Row("data", ["validate", "{data}/eval.json", "--quiet"], 0, "good samples: 6"),
                 id="10-validate-quiet-still-accepted"),
    # already working, kept working
    pytest.param(Row("train", TRAIN + [OUT, "foo=1"], 2, "unknown training config keys ['foo']",
                     absent=("{tmp}/out",)), id="ok-unknown-key"),
    pytest.param(Row("train", TRAIN + [OUT, "optim.lrr=1"], 2, "unknown keys in optim: ['lrr']",
                     absent=("{tmp}/out",)), id="ok-mistyped-key"),
    pytest.param(Row("train", TRAIN + [OUT, "data.dataset={tmp}/allbad.json"], 2,
                     "no sample in a whole pass over the data is usable", setup="all_bad"),
                 id="ok-train-every-record-bad"),
    pytest.param(Row("convert", ["import", "{tmp}/emptydir", "{tmp}/conv"], 2, "config.json: missing",
                     unchanged=("{tmp}/emptydir",), absent=("{tmp}/conv",), setup="empty_dir"),
                 id="ok-convert-empty-dir"),
    pytest.param(Row("convert", ["import", "{tmp}/rnd", "{tmp}/conv"], 2, "model.safetensors: corrupt safetensors",
                     unchanged=("{tmp}/rnd",), absent=("{tmp}/conv",), setup="random_bytes"),
                 id="ok-convert-random-bytes"),
    pytest.param(Row("convert", ["import", "{tmp}/trunc", "{tmp}/conv"], 2, "truncated or corrupt shard",
                     unchanged=("{tmp}/trunc",), absent=("{tmp}/conv",), setup="truncated"),
                 id="ok-convert-truncated-shard"),
    pytest.param(Row("convert", ["export", "{frozen}/model", "{tmp}/nonempty"], 2, "pass --overwrite",
                     unchanged=("{tmp}/nonempty", "{frozen}"), setup="nonempty"),
                 id="ok-convert-export-dir-exists"),
    pytest.param(Row("plot", ["{tmp}/nodir"], 2, "nodir/metrics.jsonl: no metrics", absent=("{tmp}/nodir",)),
                 id="ok-plot-missing-dir"),
]


def digest(path: Path) -> str | None:
    """sha256 of a file's bytes, or of every file (name and bytes) under a directory; None if absent."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if f != path else "").encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("row", ROWS)
def test_bad_input(row: Row, request, tmp_path, capsys, monkeypatch):
    paths = {"tmp": tmp_path}
    for name in ("data", "frozen", "trained"):
        if any("{" + name + "}" in s for s in [*row.argv, *row.unchanged, *row.absent]):
            value = request.getfixturevalue(name)
            paths[name] = value[0] if name == "trained" else value
    if row.setup == "all_bad":
        _all_bad(tmp_path, request.getfixturevalue("data"))
    elif row.setup:
        SETUPS[row.setup](tmp_path)
    fill = lambda s: s.format(**{k: str(v) for k, v in paths.items()})
    unchanged = {p: digest(Path(fill(p))) for p in row.unchanged}
    assert all(v is not None for v in unchanged.values()), unchanged
    monkeypatch.chdir(tmp_path)  # relative paths must not depend on where the command runs
    if row.argv0:
        monkeypatch.setattr(sys, "argv", [row.argv0])
    capsys.readouterr()
    try:
        rc = MAINS[row.cli]([fill(a) for a in row.argv])
    except SystemExit as e:  # --help
        rc = e.code
    out = capsys.readouterr()
    text = out.out + out.err
    assert rc == row.rc, text[-3000:]
    if row.message.startswith("re:"):
        assert re.search(row.message[3:], text), text[-3000:]
    else:
        assert row.message in text, text[-3000:]
    if row.rc == 2:  # one line, no traceback
        assert "Traceback" not in text
        assert len([ln for ln in out.err.splitlines() if ": error: " in ln]) == 1, out.err
    if row.not_in:
        assert row.not_in not in text
    for p, before in unchanged.items():
        assert digest(Path(fill(p))) == before, f"{fill(p)} changed"
    for p in row.absent:
        assert not Path(fill(p)).exists(), f"{fill(p)} was written"


@pytest.mark.parametrize("cli_name, argv, exc", [
    ("train", ["--config", "{tmp}/bad.yaml", "--debug"], ValueError),
    ("data", ["validate", "{tmp}/nonexistent.json", "--debug"], FileNotFoundError),
    ("convert", ["import", "{tmp}/nodir", "{tmp}/conv", "--debug"], ValueError),
    ("plot", ["{tmp}/nodir", "--debug"], FileNotFoundError),
])
def test_debug_shows_the_traceback(cli_name, argv, exc, tmp_path):
    _bad_yaml(tmp_path)
    with pytest.raises(exc):
        MAINS[cli_name]([a.format(tmp=tmp_path) for a in argv])


def test_run_cli_maps_expected_errors_and_lets_bugs_through(capsys):
    from mufun_jax.errors import InputError

    def fail(e):
        def main():
            raise e
        return main

    for e in (FileNotFoundError(2, "No such file or directory", "x.json"), yaml.YAMLError("bad\n  yaml"),
              ValueError("bad value"), InputError("missing_file", "gone"), PermissionError(13, "Permission denied",
                                                                                           "/ro")):
        assert cli.run_cli("prog", fail(e), debug=False) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["prog: error: x.json: No such file or directory", "prog: error: bad yaml", "prog: error: bad value",
                   "prog: error: gone", "prog: error: /ro: Permission denied"]
    with pytest.raises(ValueError):
        cli.run_cli("prog", fail(ValueError("x")), debug=True)
    with pytest.raises(KeyError):  # a bug is never hidden
        cli.run_cli("prog", fail(KeyError("k")), debug=False)
    assert cli.run_cli("prog", lambda: 3, debug=False) == 3


@pytest.mark.slow  # its run is a train.py subprocess (the progress bar is on a real stderr)
def test_eval_loss_line_is_not_glued_to_the_progress_bar(trained):
    _, err = trained
    segments = [s for s in re.split(r"[\r\n]", err) if "eval loss at step" in s]
    assert segments and all(s.startswith("INFO") for s in segments), segments


@pytest.mark.slow  # a third training run; the refusal rows above cover resume in the quick tier
def test_resume_with_the_same_architecture_still_works(frozen, data, tmp_path, capsys):
    """The check compares the architecture and the trainable set only: a resume with another
    learning rate, step count or run setting goes on from the checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(frozen, run)
    rc = cli.train_main(["--config", str(data / "c.yaml"), f"output_dir={run}", "max_steps=2", "optim.lr=5e-4",
                         "dtype=float32", "--no-progress"])
    assert rc == 0 and "done at step 2" in capsys.readouterr().out
    assert json.loads((run / "train_config.json").read_text())["optim"]["lr"] == 5e-4


def test_validate_and_training_resolve_audio_the_same_way(data):
    from mufun_jax.data import dataset

    assert dataset.audio_root_for(data / "train.json") == str(data)
    assert dataset.audio_root_for(data / "train.json", "/x") == "/x"
