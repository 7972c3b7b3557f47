# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv with the pinned, CPU-only stack on first use, then runs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned in the same pip call as everything else so the resolver never swaps in
# another build. On CPU machines this is the CPU wheel; on a GPU node install the matching
# ROCm/CUDA build of torch first and set TORCH_SPEC to that version.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export TORCH_EXTENSIONS_DIR ?= $(abspath .cache/torch_extensions)
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup demo test test-slow test-unit test-numerics test-integration bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/raytune-llama finetune examples/configs/tiny_cpu.yaml

test: setup
	$(BIN)/python -m pytest tests -q

# The slow tier (chaos, resharding across layouts and world sizes, every one-line layout
# family): minutes each; CI runs it after `make test`.
test-slow: setup
	$(BIN)/python -m pytest tests -q -m slow

test-unit: setup
	$(BIN)/python -m pytest tests/unit -q

test-numerics: setup
	$(BIN)/python -m pytest tests/numerics -q -s

test-integration: setup
	$(BIN)/python -m pytest tests/integration -q

bench: setup
	$(BIN)/python bench/data_throughput.py
	$(BIN)/python bench/planner_speed.py

clean:
	rm -rf runs .pytest_cache
