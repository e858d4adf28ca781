# The two set-up commands of the README: `make demo` and `make test`. Both create .venv and
# install everything they need on first use (scripts/setup_env.sh).
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.ted-ds-installed
# DeepSpeed's JIT-compiled ops are built here, once per CPU (ted_ds/host.py adds the CPU's key), and reused.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-lowest check bench gpu-wheels gpu-check

$(STAMP): setup.py constraints-cpu.txt scripts/setup_env.sh
	bash scripts/setup_env.sh

demo: $(STAMP)
	$(VENV)/bin/python -m ted_ds.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

# The unit and export tests against the lowest transformers and DeepSpeed setup.py declares (.venv-lowest).
test-lowest:
	bash scripts/lowest_versions.sh

check: $(STAMP)
	$(VENV)/bin/ruff check ted_ds data_prep tests bench

bench: $(STAMP)
	$(VENV)/bin/python -m bench

# Wheels for a GPU machine with no network (Python 3.12, x86-64): DeepSpeed (pure Python, ops JIT)
# and what it and ted-ds import that such a machine lacks, into .whl/. There: `. scripts/gpu_install.sh`.
gpu-wheels: $(STAMP)
	bash scripts/gpu_wheels.sh

# The large-scale path on one GPU (bench/gpu_check.py): a ~3.6B teacher and a ~1.2B student at a 128k
# vocabulary, in resumable sections, headline figures first (student, ted, levers, documents, attention,
# teacher, kd, distill). `ARGS="--sections student,ted --budget-s 500"` picks sections and a time budget
# (see --help); a second call with the same --work (default .cache/gpu-check) reuses finished sections.
# One short GPU slot, as one command: bash scripts/gpu_slot.sh [BUDGET_S] [RESULTS_DIR]. On a GPU machine
# without network, carry .whl (make gpu-wheels). `make gpu-check ARGS=--dry-run` runs it on CPU, tiny shapes.
GPU_PYTHON ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
gpu-check:
	$(if $(wildcard .whl/*.whl),. scripts/gpu_install.sh &&) $(GPU_PYTHON) -m bench.gpu_check $(ARGS)
