"""What a SIGTERM does to our long runs. On spot and preemptible machines it is the notice that the VM
goes in about 30 s: training saves at the next step and stops (:class:`PreemptionWatch`); inference
stops after the result it is writing (:class:`GracefulStop`). Both exit with ``EXIT_PREEMPTED``, and
running the same command again resumes."""

from __future__ import annotations

import logging
import signal
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger("mufun_jax.train_lib")  # the training log's name, which users filter on


class PreemptionWatch:
    """A preemption notice (SIGTERM; on a spot TPU the VM gets one about 30 s before it goes) makes
    every host save at the same next step boundary and stop. Under ``jax.distributed`` JAX's own
    preemption service catches the signal and picks that step for all hosts
    (``multihost_utils.reached_preemption_sync_point``); in one process a SIGTERM handler does. A
    second SIGTERM during the save is logged and ignored: the save completes, and if the process is
    killed anyway, Orbax's atomic commit leaves the previous checkpoint as the newest."""

    def __init__(self):
        self.signal_at: float | None = None
        self._old = None
        self.jax_service = (jax.process_count() > 1 and jax.distributed.is_initialized()
                            and bool(jax.config.jax_enable_preemption_service))
        if self.jax_service or threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            if self.signal_at is None:
                self.signal_at = time.perf_counter()
                log.warning("preemption notice (%s): saving a checkpoint after the current step, then exiting",
                            signal.Signals(signum).name)
            else:
                log.warning("another %s while saving: ignored, the save completes", signal.Signals(signum).name)

        self._old = signal.signal(signal.SIGTERM, handler)

    def reached(self, step: int) -> bool:
        """Whether to save and stop after ``step``; every host must call it at every step."""
        if self.jax_service:
            hit = multihost_utils.reached_preemption_sync_point(step)
            if hit and self.signal_at is None:
                self.signal_at = time.perf_counter()
            return hit
        if jax.process_count() > 1:  # no preemption service: agree on the flag explicitly
            return bool(np.max(multihost_utils.process_allgather(np.int32(self.signal_at is not None))))
        return self.signal_at is not None

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


class GracefulStop:
    """Within the block, SIGTERM (and a second Ctrl-C) asks the loop to stop after the current
    result instead of killing the process mid-write; ``requested`` names the signal."""

    def __init__(self):
        self.requested = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:  # a second signal while stopping: leave now (the file stays valid)
                raise KeyboardInterrupt
            self.requested = signal.Signals(signum).name

        self._old = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._old)
        return False
