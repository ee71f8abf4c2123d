# The few verbs: setup, test, perf, lint. Everything installs into ./.venv from the project's own
# files, so a fresh clone needs nothing but python3 (3.10+) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test perf lint format fuzz

setup: $(VENV)/.installed

# torch is pinned first: these machines carry a CPU wheel of 2.13.0; a looser requirement would
# pull the registry's CUDA build (several GB). On a GPU machine the same pin gets the CUDA build.
# Then the zoo extra (tests/test_zoo.py converts timm, diffusers and torchvision models), about
# 25 MB: the three with --no-deps, so that pip never swaps torch (torchvision pins its torch
# exactly), then their small pure-Python dependencies with torch held at its pin. torchvision
# 0.28.0 is the release for torch 2.13.0; the registry's wheel is a CUDA build whose C++
# operators cannot load beside the CPU torch (tests/test_zoo.py says how it copes).
ZOO := "torchvision==0.28.0" "timm==1.0.31" "diffusers==0.42.1"
ZOO_DEPS := huggingface-hub safetensors pyyaml regex requests importlib-metadata pillow

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(ZOO)
	$(BIN)/python -m pip install -q "torch==2.13.0" $(ZOO_DEPS)
	touch $@

# The suite on one pytest-xdist worker per core (at most 4): each test is single-threaded
# interpreter work. --dist loadfile sends each file to one worker, so that the module-scoped
# fixtures that run a subprocess (the sm_90 compile check and its probes, perf.hostcost, the
# SyncBatchNorm ranks, torch's OpInfo samples, the perf.gpu dry run) run once, not once per worker
# (xdist_group marks with --dist loadgroup would be finer, but pytest-xdist 3.8 cannot apply them
# under pytest 9: it renames items through Node._nodeid, which pytest 9 no longer reads).
# --no-loadscope-reorder: files in collection order, not fewest tests last (that put the sm_90
# compile check, 7 tests and a third of the suite's time, at the end).
test: setup
	$(BIN)/ruff check tritonnorm tests perf examples
	$(BIN)/ruff format --check tritonnorm tests perf examples
	$(BIN)/python -m pytest -q --durations=10 -n auto --maxprocesses=4 --dist loadfile \
		--no-loadscope-reorder

# The differential property test (tests/test_properties.py) with thousands of examples instead of
# CI's derandomized minute; pin whatever it finds there as an @example. Vary the draw with e.g.
#   make fuzz FUZZ_ARGS=--hypothesis-seed=3
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_properties.py \
		$(FUZZ_ARGS)

perf: setup
	$(BIN)/python -m perf

# On a lent GPU machine, from a plain checkout with that machine's own python3 (no venv): every
# stage within 480 s, inside its 10-minute command limit (perf/NOTES.md). Add GPU_ARGS=--dry-run
# to try it on a CPU.
.PHONY: gpu
gpu:
	PYTHONPATH=. $(PYTHON) -m perf.gpu --out perf/results/gpu-run $(GPU_ARGS)

lint: setup
	$(BIN)/ruff check tritonnorm tests perf examples
	$(BIN)/ruff format --check tritonnorm tests perf examples

format: setup
	$(BIN)/ruff check --fix tritonnorm tests perf examples
	$(BIN)/ruff format tritonnorm tests perf examples

# Compatibility check on another torch/triton pair (not in CI), e.g.
#   make compat TORCH=2.14.1 TRITON=3.8.0
# A venv per pair under COMPAT_DIR (git-ignored; created on first use, reused after), the project
# with its test deps, then COMPAT_TESTS under the interpreter: BN/IN/GN forward and backward on the
# fused and split paths, dtypes, affine/momentum/empty variants and modules (test_norms.py), module
# API, convert, torch.compile and opcheck (test_modules.py), torch's errors (test_errors.py), forced
# kernel paths and int64 offsets (test_kernel_paths.py), the byte counter (test_byte_budget.py),
# fused activation/residual epilogues and their byte budgets (test_epilogues.py, test_epilogue_bytes.py).
# Left out: layout/stride variants (same kernels, other strides), test_accuracy.py (numerics,
# slow gradchecks), SyncBatchNorm (multi-process), the sm_90 compile check, perf.gpu and examples.
# 2-4 minutes on a 2-core machine; COMPAT_TESTS=tests runs the whole suite.
# Default pair: torch 2.13.0 (CPU wheel) + triton 3.6.0, the oldest triton declared. Other torch
# builds are CUDA builds (~5.5 GB per venv); torch > 2.14.1 needs this machine's pip constraint
# lifted (PIP_CONSTRAINT=/dev/null make compat ...).
TORCH ?= 2.13.0
TRITON ?= 3.6.0
COMPAT_DIR ?= .compat
COMPAT_VENV ?= $(COMPAT_DIR)/torch$(TORCH)-triton$(TRITON)
COMPAT_TESTS ?= tests/test_norms.py tests/test_modules.py tests/test_errors.py \
	tests/test_kernel_paths.py tests/test_byte_budget.py tests/test_epilogues.py \
	tests/test_epilogue_bytes.py \
	--deselect tests/test_norms.py::test_other_strides --deselect tests/test_norms.py::test_channels_last

.PHONY: compat
compat:
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q "torch==$(TORCH)" "triton==$(TRITON)"
	$(COMPAT_VENV)/bin/python -m pip install -q -e ".[test]" "torch==$(TORCH)" "triton==$(TRITON)"
	$(COMPAT_VENV)/bin/python -c "import numpy, torch, triton; print('compat: torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=5 $(COMPAT_TESTS)
