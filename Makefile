# Two set-up commands, each working alone on a fresh machine:
#   make train   creates .venv if missing, installs vitcli, trains configs/cifar10.yaml
#   make test    creates .venv if missing, installs vitcli with the dev extras, runs the tests
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
CONFIG ?= configs/cifar10.yaml

.PHONY: train test tensorboard bench benchmark clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

train: $(VENV)/.installed
	$(VENV)/bin/vit train --config $(CONFIG)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q --durations=10

tensorboard: $(VENV)/.installed
	$(VENV)/bin/tensorboard --logdir runs

bench: $(VENV)/.installed
	$(VENV)/bin/vit bench --config $(CONFIG)

benchmark: $(VENV)/.installed-dev
	$(PY) benchmarks/vs_timm.py --epoch

clean-venv:
	rm -rf $(VENV)
