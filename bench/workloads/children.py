"""How bench/compare.py runs each side: in child processes, so that no process ever holds both
runtimes (JAX and torch) and each side's peak RSS and compile time are its own.

A child is ``bench/compare.py --child SPEC`` (SPEC: the task name, the settings, a shared work
directory). It sets up its task (see ``CHILDREN`` in bench/compare.py), prints one ready line, then
answers one named op per line of stdin with one tagged JSON line on stdout; its stderr goes to a
temporary file that is shown when it dies."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .settings import Settings

DRIVER = Path(__file__).resolve().parents[1] / "compare.py"  # the script a child runs, with --child
RESULT_TAG = "@@COMPARE_RESULT@@ "


def serve(ops: dict) -> None:
    """Child main loop, once the task has set up its ``ops`` (name -> function returning a JSON-able
    value): say ready, then run one named op per line of stdin."""
    print(RESULT_TAG + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        op = line.strip()
        if op:
            print(RESULT_TAG + json.dumps(ops[op]()), flush=True)


CHILD_ENV: dict = {}  # extra environment for the children (--parallel: one torch thread each)


class Child:
    """A child process running :func:`serve`; ``call(op)`` returns the op's JSON result."""

    def __init__(self, task: str, s: Settings, workdir: str, timeout: float):
        env = dict(os.environ)
        if s.device == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(CHILD_ENV)
        self.task, self.timeout, self.t0 = task, timeout, time.perf_counter()
        self.err = tempfile.TemporaryFile(mode="w+")
        spec = json.dumps({"task": task, "settings": dataclasses.asdict(s), "workdir": workdir})
        self.proc = subprocess.Popen([sys.executable, str(DRIVER), "--child", spec], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True,
                                     cwd=str(DRIVER.parents[1]), bufsize=1)
        try:
            self._read()  # ready
        except BaseException:
            self.kill()
            raise

    def _read(self) -> dict:
        import select

        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise TimeoutError(f"child {self.task} gave no answer in {self.timeout:.0f} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait(timeout=30)
                self.err.seek(0)
                raise RuntimeError(f"child {self.task} exited ({self.proc.returncode}):\n{self.err.read()[-6000:]}")
            if line.startswith(RESULT_TAG):
                return json.loads(line[len(RESULT_TAG):])

    def call(self, op: str) -> dict:
        self.proc.stdin.write(op + "\n")
        self.proc.stdin.flush()
        try:
            return self._read()
        except BaseException:
            self.kill()
            raise

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        self.err.close()
        print(f"  {self.task:10s} done, {time.perf_counter() - self.t0:.0f} s", file=sys.stderr, flush=True)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_once(task: str, s: Settings, timeout: float) -> dict:
    child = Child(task, s, "", timeout)
    try:
        return child.call("run")
    finally:
        child.close()

