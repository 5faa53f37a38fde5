"""What every command line of the project shares: one flag style (:class:`ArgumentParser`), the
common flags, logging, and :func:`run_cli`, which turns an expected failure into one line and exit
status 2. It imports nothing heavy and none of the CLIs, so each front end (``mufun_jax.cli``,
``python -m mufun_jax.aot``, ``python -m mufun_jax.data``, the tagger, the evaluator) builds on it
without reaching up to another front end.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

import yaml

from mufun_jax.errors import CheckpointError, InputError

EXIT_USAGE = 2  # bad input: the one-line error of run_cli, argparse's usage errors


def invoked_as(*names: str) -> str:
    """The program name for usage lines and errors: the name this process was started as when it is
    one of ``names`` (``mufun-train`` and ``train.py`` are the same CLI), else ``names[0]`` (e.g.
    in-process calls from tests, where ``sys.argv[0]`` is pytest)."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name in names else names[0]


def one_line(e: BaseException) -> str:
    """An exception as one line: OSErrors as ``PATH: reason``, multi-line messages (YAML's
    marks, Orbax's shape dumps) joined, very long ones cut."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        text = f"{e.filename}: {e.strerror}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
    else:
        text = str(e) or type(e).__name__
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text if len(text) <= 2000 else text[:2000] + " ..."


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures that are the input's fault, not a bug: I/O errors, bad YAML, bad values (InputError
    and CheckpointError are ValueErrors), corrupt JSON (a ValueError too)."""
    return (OSError, yaml.YAMLError, ValueError, InputError, CheckpointError)


def run_cli(prog: str, main: Callable[[], int], debug: bool) -> int:
    """Run a CLI's ``main`` and return its exit status. An expected failure (:func:`expected_errors`)
    becomes ``PROG: error: MESSAGE`` on stderr and status 2, instead of a traceback that hides the
    one line that matters; with ``debug`` it propagates, traceback and all. Anything else (a bug)
    always propagates."""
    try:
        return main()
    except expected_errors() as e:
        if debug:
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with one flag style: a ``--snake_case`` spelling of a known ``--kebab-case``
    option is read as that option, without showing up in ``--help``."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        known = {o for a in self._actions for o in a.option_strings}
        for sp in self._subparsers._group_actions if self._subparsers else ():
            for p in sp.choices.values():
                known |= {o for a in p._actions for o in a.option_strings}
        out = []
        for a in args:
            name, eq, value = str(a).partition("=")
            if name.startswith("--") and "_" in name and name.replace("_", "-") in known:
                a = name.replace("_", "-") + eq + value
            out.append(a)
        return super().parse_known_args(out, namespace)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows each option's default in ``--help`` where it has one worth showing (not None/False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings and "default" not in text):
            text += " (default: %(default)s)"
        return text


def add_common(ap: argparse.ArgumentParser, progress: bool = True) -> None:
    """The flags every CLI shares: ``--debug`` and (where there is a bar) ``--no-progress``."""
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    if progress:
        ap.add_argument("--no-progress", action="store_true", help="no progress bar")


def setup_logging() -> None:
    """Our INFO lines; warnings only from other libraries (Orbax logs every file at INFO)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mufun_jax").setLevel(logging.INFO)  # ours, without Orbax's per-file INFO lines
    try:  # absl comes with jax; without it there is nothing to quieten
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass


def exit_with(rc: int) -> None:
    """End a console script with ``rc``. On rc 2 nothing was written, so the process ends without
    the interpreter's teardown: after a damaged checkpoint, Orbax's abandoned reads would otherwise
    print hundreds of lines of tracebacks below the one-line error."""
    if rc == 2:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    sys.exit(rc)
