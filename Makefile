# Two set-up commands work on a fresh clone: `make serve` and `make test`. Both create .venv and install the
# project with torch pinned (torch==2.13.0: a CPU wheel here, a CUDA build on a GPU machine).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=

.PHONY: install serve test bench lint demo-model demo-adapters seeded-adapters profile clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo-model: $(STAMP)
	$(VENV)/bin/switchboard demo-model --out .cache/demo-model

# Seeded random adapters (seconds): what `make serve` registers when no trained ones exist yet.
seeded-adapters: demo-model
	$(VENV)/bin/switchboard demo-adapters --model .cache/demo-model --out .cache/demo-adapters

# Train one adapter of each kind on its demo task (training/tasks/; a few minutes on 2 CPU threads).
demo-adapters: demo-model
	$(VENV)/bin/switchboard demo-adapters --train --model .cache/demo-model --out .cache/demo-adapters-trained

# Per kind: the trained adapter if `make demo-adapters` has run, else the seeded one.
demo_dir = $(if $(wildcard .cache/demo-adapters-trained/demo-$(1)/training_log.json),.cache/demo-adapters-trained,.cache/demo-adapters)
DEMO_ADAPTER_FLAGS = $(foreach k,lora krona ia3 prefix,--adapter demo-$(k)=$(call demo_dir,$(k))/demo-$(k))

serve: seeded-adapters
	$(VENV)/bin/switchboard serve --model .cache/demo-model --host $(HOST) --port $(PORT) $(DEMO_ADAPTER_FLAGS) $(SERVE_ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest -q  # not `python -m pytest`: that puts the repo root on sys.path, where `import kernels` would find our folder

bench: demo-model
	$(VENV)/bin/switchboard bench --model .cache/demo-model

profile: demo-model
	$(VENV)/bin/switchboard profile --model .cache/demo-model

lint: $(STAMP)
	$(VENV)/bin/ruff check serving adapters_store kernels loadtest training tests
	$(VENV)/bin/ruff format --check serving adapters_store kernels loadtest training tests

clean:
	rm -rf $(VENV) .cache bench-results
