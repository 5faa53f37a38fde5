# `make test` works from a fresh clone with only python3: it builds .venv, installs .[test], runs the
# quick tier of pytest (every module, minus the tests marked slow); `make test-all` runs everything
# and builds the docs site (mkdocs.yml) with --strict, so a broken link between pages fails it.
# jax 0.11 and later need Python 3.12 or newer: take the first such interpreter on PATH or in pyenv,
# or PYTHON=/path/to/python3.12.
PYTHON ?= $(shell for p in python3.12 python3.13 python3.14 python3 $$HOME/.pyenv/versions/3.1[2-9]*/bin/python; do \
	$$p -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null && { echo $$p; break; }; done)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test test-all install clean demo demo-lora demo-grpo bench bench-tpu docs

# The repository goes first on PYTHONPATH, so a clone tests its own code even where .venv's editable
# install points at another checkout. Both tiers print their 15 slowest tests.
PYTEST = PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} MUFUN_LIBTPU=$(LIBTPU) $(PY) -m pytest tests --durations=15

test: $(VENV)/.installed
	$(PYTEST) -m "not slow"

test-all: $(VENV)/.installed
	$(PYTEST)
	$(MKDOCS)

# The docs site (mkdocs-material, in the test and docs extras) -> build/site. Not --quiet: in mkdocs 1.6
# --quiet also hides the warnings that --strict counts, so a broken link would pass.
MKDOCS = NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir $(CURDIR)/build/site

docs: $(VENV)/.installed
	$(MKDOCS)

install: $(VENV)/.installed

# libtpu (what `jax[tpu]` would add) goes to $(VENV)/libtpu, outside site-packages: the TPU
# ahead-of-time compile tests find it there (tests/conftest.py), while no other JAX process of this
# CPU install ever loads a TPU runtime (which prints start-up errors on machines without a TPU).
LIBTPU = $(VENV)/libtpu

$(VENV)/.installed: setup.cfg pyproject.toml
	@test -n "$(PYTHON)" || { echo "make: no Python 3.12 or newer found (tried python3.12, python3.13, python3.14," \
		"python3 and ~/.pyenv/versions/3.1x); jax 0.12 needs one: install it or pass PYTHON=/path/to/python3.12" >&2; exit 2; }
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 12), sys.version' 2>/dev/null || { \
		echo "make: PYTHON=$(PYTHON) is older than 3.12; jax 0.12 needs 3.12 or newer" >&2; exit 2; }
	@if [ -x $(PY) ] && ! $(PY) -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then \
		echo "make: $(VENV) was built with an older Python; rebuilding it with $(PYTHON)"; rm -rf $(VENV); fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(LIBTPU) "$$($(PY) -c 'import importlib.metadata as m; print(next(r.split(";")[0].strip() for r in m.requires("jax") if r.startswith("libtpu")))')"
	touch $@

# The CPU demo: synthetic clips + an offline tokenizer, two training stages, batched answers on
# held-out clips, a summary and runs/demo/report.png. No downloads.
demo: $(VENV)/.installed
	@$(PY) -m mufun_jax.demo run --out runs/demo

# Optional, after `make demo`: QLoRA adapters teach the demo model a new instruction
# (configs/demo_lora.yaml); prints the held-out accuracy before and after.
demo-lora: $(VENV)/.installed
	@$(PY) -m mufun_jax.demo lora --out runs/demo

# GRPO on the demo (configs/demo_grpo.yaml): the demo's SFT stopped early, then GRPO with the
# multiple-choice accuracy reward on its weakest task; prints the held-out accuracy before and after
# and draws runs/demo/report_grpo.png. Reuses make demo's data and warmup stage when present.
demo-grpo: $(VENV)/.installed
	@$(PY) -m mufun_jax.grpo.demo --out runs/demo

# JAX vs the PyTorch reference, side by side on this machine: bench/results.{json,md} (README links
# them). Run it on a quiet machine: about 30 minutes a round (fp32 and bf16; three rounds) on 2 CPU cores. Not part of `make test`.
# bench/ scripts import mufun_jax from this checkout (PYTHONPATH, as for the tests) and their own
# bench/workloads package (Python puts the script's folder first on the path); none edits sys.path.
bench: $(VENV)/.installed
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PY) bench/compare.py --repeats 3 --out bench

# Our train step and MaxText's Qwen3-8B, compiled ahead of time for v5p-128 and v6e-64 on this CPU
# host and compared per chip (bench/tpu_vs_maxtext.py -> bench/tpu_vs_maxtext.{json,md}; docs/tpu.md).
# Its own environment, not .venv: maxtext[tpu]==0.2.5 needs mpmath>=1.4.1, every sympy that torch
# 2.13.0 (the test extra) accepts (>=1.13.3) needs mpmath<1.4, so pip finds no set holding both
# (ResolutionImpossible, 2026-12-07). Same Python and jax as .venv; libtpu is MaxText's (0.0.52).
# About 30 minutes on 2 cores. Not part of `make test`.
TPU_VENV ?= .venv-tpu

$(TPU_VENV)/.installed: setup.cfg pyproject.toml
	@test -n "$(PYTHON)" || { echo "make bench-tpu: no Python 3.12 or newer found; pass PYTHON=/path/to/python3.12" >&2; exit 2; }
	$(PYTHON) -m venv $(TPU_VENV)
	$(TPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TPU_VENV)/bin/python -m pip install --quiet "maxtext[tpu]==0.2.5"
	$(TPU_VENV)/bin/python -m pip install --quiet -e .
	touch $@

bench-tpu: $(TPU_VENV)/.installed
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} JAX_PLATFORMS=cpu $(TPU_VENV)/bin/python bench/tpu_vs_maxtext.py --out bench

clean:
	rm -rf $(VENV) $(TPU_VENV) build *.egg-info .pytest_cache
