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

# The embedded default: 0.14M-parameter DiffusionGemmas trained from scratch on 4x4 and 6x6 Sudoku (sudoku/models/)
# solve a puzzle each on the CPU, showing every denoising step, then face their autoregressive twins on 200 puzzles.
demo: $(STAMP)
	$(VENV)/bin/dgemma sudoku 0024000000020300
	$(VENV)/bin/dgemma sudoku 020030000002043210006004350021062003
	$(VENV)/bin/dgemma eval sudoku --size 4 --count 200 --steps 1 4 16 --baseline
	$(VENV)/bin/dgemma eval sudoku --size 6 --count 200 --steps 1 4 16 --baseline

clean:
	rm -rf $(VENV) build dist *.egg-info
