# The two set-up commands of the README: `make demo` and `make test`. Both create .venv and
# install everything they need on first use (scripts/setup_env.sh).
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.ted-ds-installed
# DeepSpeed's JIT-compiled ops are built once here and reused by every run and test.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test check bench

$(STAMP): setup.py constraints-cpu.txt scripts/setup_env.sh
	bash scripts/setup_env.sh

demo: $(STAMP)
	$(VENV)/bin/python -m ted_ds.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

check: $(STAMP)
	$(VENV)/bin/ruff check ted_ds data_prep tests bench

bench: $(STAMP)
	$(VENV)/bin/python -m bench
