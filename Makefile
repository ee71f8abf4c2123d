# The few verbs: setup, test, perf, lint. Everything installs into ./.venv from the project's own
# files, so a fresh clone needs nothing but python3 (3.10+) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test perf lint format

setup: $(VENV)/.installed

# torch is pinned first: these machines carry a CPU wheel of 2.13.0; a looser requirement would
# pull the registry's CUDA build (several GB). On a GPU machine the same pin gets the CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

test: setup
	$(BIN)/ruff check tritonnorm tests perf
	$(BIN)/ruff format --check tritonnorm tests perf
	$(BIN)/python -m pytest -q --durations=10

perf: setup
	$(BIN)/python -m perf

# On a lent GPU machine, from a plain checkout with that machine's own python3 (no venv): every
# stage within 480 s, inside its 10-minute command limit (perf/NOTES.md). Add GPU_ARGS=--dry-run
# to try it on a CPU.
.PHONY: gpu
gpu:
	PYTHONPATH=. $(PYTHON) -m perf.gpu --out perf/results/gpu-run $(GPU_ARGS)

lint: setup
	$(BIN)/ruff check tritonnorm tests perf
	$(BIN)/ruff format --check tritonnorm tests perf

format: setup
	$(BIN)/ruff check --fix tritonnorm tests perf
	$(BIN)/ruff format tritonnorm tests perf
