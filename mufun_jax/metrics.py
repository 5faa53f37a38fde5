"""Training metrics: one JSON object a line in ``metrics.jsonl`` and TensorBoard event files."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsWriter:
    """Scalars to ``metrics.jsonl`` (one object a line, appended across restarts) and to TensorBoard
    event files. Only process 0 writes."""

    def __init__(self, log_dir: str | Path, enabled: bool = True):
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self._tb = None
        if enabled:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.log_dir / "metrics.jsonl", "a")
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.log_dir / "tensorboard"))
            except ImportError:  # optional: JSONL is always written
                log.warning("tensorboardX is not installed; metrics go to metrics.jsonl only")

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


# -- reading and plotting -------------------------------------------------------------------------


def read_metrics(run_dir) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train loss, eval loss) as (step, value) lists from ``RUN_DIR/metrics.jsonl``. A restarted run
    appends to the file; a step logged twice keeps its last value."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a train.py output_dir?)")
    train, evals = {}, {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            log.warning("%s:%d: not JSON, skipped", path, n)
            continue
        if "loss" in row:
            train[row["step"]] = row["loss"]
        if "eval_loss" in row:
            evals[row["step"]] = row["eval_loss"]
    return sorted(train.items()), sorted(evals.items())


def plot_runs(run_dirs, out, *, names=None, accuracy: dict | None = None, title: str | None = None) -> Path:
    """One PNG: the train loss (and eval loss points) of each run, one after the other on a shared
    step axis (e.g. the demo's warmup then full stage); with ``accuracy`` ({task: (right, total)})
    a bar chart beside it. Written atomically; returns the path. A run without any loss value is an
    error (ValueError) and nothing is written: an empty plot would look like a result."""
    import matplotlib  # heavy; only the plot needs it

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    run_dirs = [Path(d) for d in run_dirs]
    names = names or [d.name for d in run_dirs]
    curves = [read_metrics(d) for d in run_dirs]  # every run read (and checked) before a figure exists
    for d, (train, evals) in zip(run_dirs, curves):
        if not train and not evals:
            raise ValueError(f"{d / 'metrics.jsonl'}: no loss values to plot (the run has not logged a step yet)")
    fig, axes = plt.subplots(1, 2 if accuracy else 1, figsize=(11 if accuracy else 7, 4), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1]} if accuracy else None)
    ax = axes[0][0]
    offset = 0
    for i, (name, (train, evals)) in enumerate(zip(names, curves)):
        color = f"C{i}"
        if train:
            ax.plot([offset + s for s, _ in train], [v for _, v in train], color=color, lw=1, label=f"{name}: train")
        if evals:
            ax.plot([offset + s for s, _ in evals], [v for _, v in evals], "o--", color=color, ms=4,
                    label=f"{name}: eval")
        if i and offset:
            ax.axvline(offset, color="grey", lw=0.5, ls=":")
        offset += max([s for s, _ in train] + [s for s, _ in evals] + [0])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if accuracy:
        bx = axes[0][1]
        tasks = sorted(accuracy)
        acc = [accuracy[t][0] / max(accuracy[t][1], 1) for t in tasks]
        bars = bx.bar(tasks, [100 * a for a in acc], color="C2")
        for b, t in zip(bars, tasks):
            bx.text(b.get_x() + b.get_width() / 2, b.get_height() + 1, f"{accuracy[t][0]}/{accuracy[t][1]}",
                    ha="center", fontsize=8)
        bx.set_ylim(0, 110)
        bx.set_ylabel("held-out accuracy (%)")
        bx.axhline(90, color="grey", lw=0.5, ls=":")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
