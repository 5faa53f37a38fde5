"""Training metrics: one JSON object a line in ``metrics.jsonl`` and TensorBoard event files."""

from __future__ import annotations

import json
import logging
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
