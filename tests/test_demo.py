"""The demo, shortened for the test suite: the real code path of ``make demo`` (synthetic data, the
warmup and full training stages through train.py's config, batched answers through the inference
API, the summary and the report picture), with half the held-out clips and no mid-run evals or
checkpoints. The training steps are the demo's own: with 150-180 full-stage steps one task or
another stays near chance (measured), so a shorter test would not show what the demo does. Every
task must be learnt well above chance, and the report must be a real PNG."""

import matplotlib.image
import pytest

from mufun_jax import demo

CHANCE = {"instrument": 0.25, "notes": 0.5, "register": 0.5}


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    acc = demo.run(out, n_eval=48, warmup_overrides=("progress=false",),
                   full_overrides=("eval_every=0", "save_every=1000", "progress=false"))
    return out, acc


@pytest.mark.slow  # the demo's own training steps (minutes) are what it checks
def test_every_task_is_learnt_well_above_chance(short_demo):
    _, acc = short_demo
    assert set(acc) == set(CHANCE)
    for task, (right, total) in acc.items():
        assert total == 16 and right / total >= CHANCE[task] + 0.35, (task, right, total)


@pytest.mark.slow
def test_the_report_is_a_picture(short_demo, capsys):
    out, _ = short_demo
    png = out / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(png)
    assert img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 0.01
    assert (out / "accuracy.json").exists()


@pytest.mark.slow  # reads the full demo run of the accuracy tests (its training is minutes)
def test_the_demo_scores_itself_through_mufun_eval(short_demo):
    """The held-out clips, as one multiple-choice subset per task, go through mufun-eval; the
    summary reads its results.json, whose average is the mean of the subsets' accuracies."""
    import json

    out, _ = short_demo
    m = json.loads((out / "eval" / "results.json").read_text())["models"]["demo"]
    assert set(m["subsets"]) == set(CHANCE) and all(e["n"] == 16 for e in m["subsets"].values())
    assert abs(m["average"] - sum(e["accuracy"] for e in m["subsets"].values()) / 3) < 1e-9
    assert len((out / "eval" / "answers.jsonl").read_text().splitlines()) == 48


@pytest.mark.slow  # the whole demo path, two steps a stage (about a minute on 2 cores): the quick tier's budget
def test_two_steps_per_stage_run_the_whole_demo_path(tmp_path):
    """The quick tier's demo: the same code path as ``make demo`` (data, both stages through the
    demo configs, batched answers, accuracy.json and the report) with a few clips and two steps per
    stage. Nothing is learnt in two steps, so only the structure is checked here; the accuracy is
    the slow test's."""
    import json

    out = tmp_path / "demo"
    acc = demo.run(out, n_train=24, n_eval=12, warmup_overrides=("max_steps=2", "progress=false"),
                   full_overrides=("max_steps=2", "eval_every=0", "save_every=1000", "progress=false"))
    assert set(acc) == set(CHANCE) and all(total == 4 and 0 <= right <= total for right, total in acc.values())
    assert {k: tuple(v) for k, v in json.loads((out / "accuracy.json").read_text()).items()} == acc
    img = matplotlib.image.imread(out / "report.png")
    assert img.shape[0] > 200 and img.shape[1] > 400 and img.std() > 0.01
