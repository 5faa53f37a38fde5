"""JAX's persistent compilation cache, on by default for train.py, infer.py, the demo and the engine.

Compiling is most of a short run's wall time on CPU (every program of the model, for every bucket
shape), and it is the same work each time the same command runs again. JAX can keep the compiled
programs on disk; this turns that on, in one documented place:

* default directory: ``$XDG_CACHE_HOME/mufun_jax/jax_cache`` (``~/.cache/mufun_jax/jax_cache``);
* ``MUFUN_COMPILE_CACHE=/some/dir`` moves it, ``MUFUN_COMPILE_CACHE=0`` (or ``off``) turns it off;
* a cache directory already set through JAX itself (``JAX_COMPILATION_CACHE_DIR`` or
  ``jax.config``) is kept as it is.

Entries are keyed on the program, the jax/XLA versions and the compile options, so a stale entry is
never used; the directory may be deleted at any time, and is capped at ``MAX_BYTES`` (least
recently used entries go first).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "MUFUN_COMPILE_CACHE"
MAX_BYTES = 4 * 2**30
# JAX's default threshold (1 s) skips most programs of a small model on CPU, which still add up.
MIN_COMPILE_S = 0.0


def cache_dir() -> Path | None:
    """The directory this process should use, or None where ``MUFUN_COMPILE_CACHE`` turns it off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("0", "off", "false", "no", "none"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mufun_jax" / "jax_cache"


def enable_compile_cache() -> str | None:
    """Point JAX's persistent compilation cache at ``cache_dir()``; returns the directory in use
    (None: off). Safe to call more than once and after programs were compiled (they were not cached)."""
    import jax

    path = cache_dir()
    if path is None:
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:  # set through JAX already: someone chose it
        return current
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: run without the cache rather than fail
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        try:
            import filelock  # noqa: F401  (jax's size cap needs it)

            jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
        except ImportError:
            pass
    return str(path)
