# Two set-up commands work on a fresh clone: `make serve` and `make test`. Both create .venv and install the
# project with torch pinned (torch==2.13.0: a CPU wheel here, a CUDA build on a GPU machine).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=

.PHONY: install serve test bench lint demo-model demo-adapters profile clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo-model: $(STAMP)
	$(VENV)/bin/switchboard demo-model --out .cache/demo-model

demo-adapters: demo-model
	$(VENV)/bin/switchboard demo-adapters --model .cache/demo-model --out .cache/demo-adapters

DEMO_ADAPTER_FLAGS := $(foreach k,lora krona ia3 prefix,--adapter demo-$(k)=.cache/demo-adapters/demo-$(k))

serve: demo-adapters
	$(VENV)/bin/switchboard serve --model .cache/demo-model --host $(HOST) --port $(PORT) $(DEMO_ADAPTER_FLAGS) $(SERVE_ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest -q  # not `python -m pytest`: that puts the repo root on sys.path, where `import kernels` would find our folder

bench: demo-model
	$(VENV)/bin/switchboard bench --model .cache/demo-model

profile: demo-model
	$(VENV)/bin/switchboard profile --model .cache/demo-model

lint: $(STAMP)
	$(VENV)/bin/ruff check serving adapters_store kernels loadtest tests

clean:
	rm -rf $(VENV) .cache bench-results
