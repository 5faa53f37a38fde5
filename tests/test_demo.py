"""The demo, shortened for the test suite: the real code path of ``make demo`` (synthetic data, the
warmup and full training stages through train.py's config, batched answers through the inference
API, the summary and the report picture), with half the held-out clips and no mid-run evals or
checkpoints. The training steps are the demo's own: with 150-180 full-stage steps one task or
another stays near chance (measured), so a shorter test would not show what the demo does. Every
task must be learnt well above chance, and the report must be a real PNG."""

import matplotlib.image
import pytest

from mufun_jax import demo

# The whole demo trains for minutes: `make test-all` only.
pytestmark = pytest.mark.slow

CHANCE = {"instrument": 0.25, "notes": 0.5, "register": 0.5}


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    acc = demo.run(out, n_eval=48, warmup_overrides=("progress=false",),
                   full_overrides=("eval_every=0", "save_every=1000", "progress=false"))
    return out, acc


def test_every_task_is_learnt_well_above_chance(short_demo):
    _, acc = short_demo
    assert set(acc) == set(CHANCE)
    for task, (right, total) in acc.items():
        assert total == 16 and right / total >= CHANCE[task] + 0.35, (task, right, total)


def test_the_report_is_a_picture(short_demo, capsys):
    out, _ = short_demo
    png = out / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(png)
    assert img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 0.01
    assert (out / "accuracy.json").exists()
