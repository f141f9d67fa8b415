# Two commands set everything up on a fresh machine: `make test` and `make demo`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint demo clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so no newer (CUDA-sized) build is pulled in by a range.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

# The main job on the embedded default: the shipped 4x4 Sudoku model solves a random puzzle on the CPU, step by step.
demo: $(STAMP)
	$(VENV)/bin/dgemma sudoku

clean:
	rm -rf $(VENV) build dist *.egg-info
