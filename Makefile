# `make test` works from a fresh clone with only python3: it builds .venv, installs .[test], runs pytest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test install clean demo demo-lora bench

test: $(VENV)/.installed
	MUFUN_LIBTPU=$(LIBTPU) $(PY) -m pytest tests

install: $(VENV)/.installed

# libtpu (what `jax[tpu]` would add) goes to $(VENV)/libtpu, outside site-packages: the TPU
# ahead-of-time compile tests find it there (tests/conftest.py), while no other JAX process of this
# CPU install ever loads a TPU runtime (which prints start-up errors on machines without a TPU).
LIBTPU = $(VENV)/libtpu

$(VENV)/.installed: setup.cfg pyproject.toml
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

# JAX vs the PyTorch reference, side by side on this machine: bench/results.{json,md} (README links
# them). Run it on a quiet machine: about 30 minutes a round (three rounds) on 2 CPU cores. Not part of `make test`.
bench: $(VENV)/.installed
	$(PY) bench/compare.py --repeats 3 --out bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
