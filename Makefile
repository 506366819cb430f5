# One entry point: `make test` and `make run` each create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install test lint run bench docs clean

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --constraint constraints.txt --editable '.[dev,tune]'
	touch $@

install: $(INSTALLED)

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

run: $(INSTALLED)
	$(BIN)/klssl up --demo

bench: $(INSTALLED)
	$(BIN)/python benchmarks/objective.py
	$(BIN)/python benchmarks/augmentation.py

docs: $(INSTALLED)  # the README's configuration reference, from the pydantic models
	$(BIN)/python -m service.reference --write README.md

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
