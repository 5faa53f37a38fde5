# `make test` works from a fresh clone with only python3: it builds .venv, installs .[test], runs pytest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test install clean demo bench

test: $(VENV)/.installed
	$(PY) -m pytest tests

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# The CPU demo: synthetic clips + an offline tokenizer, two training stages, batched answers on
# held-out clips. Everything goes to runs/demo/; no downloads.
demo: $(VENV)/.installed
	rm -rf runs/demo
	$(PY) -m mufun_jax.demo prepare runs/demo/data
	$(PY) train.py --config configs/demo_warmup.yaml
	$(PY) train.py --config configs/demo.yaml
	$(PY) -m mufun_jax.demo evaluate runs/demo/full/model runs/demo/data

# JAX vs the PyTorch reference, side by side on this machine: bench/results.{json,md} (README links
# them). Run it on a quiet machine: about 25 minutes on 2 CPU cores. Not part of `make test`.
bench: $(VENV)/.installed
	$(PY) bench/compare.py --repeats 3 --out bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
