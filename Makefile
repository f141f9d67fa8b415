# Two commands set everything up on a fresh machine: `make test` and `make demo`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint demo clean gpu-check gpu-train-sudoku9 gpu-wheels gpu-merge

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so no newer (CUDA-sized) build is pulled in by a range.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The parity tests also run against transformers 5.24.0 (tests/test_parity_versions.py), from a folder of its own;
	# the venv already satisfies its requirements, which transformers checks when imported.
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/transformers-5.24 transformers==5.24.0
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Two workers of one thread each, a test file per worker at a time (its module fixtures built once): on 2 cores that
# halves the run, where two-thread torch in two processes would stall.
test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

# The embedded default: 0.14M-parameter DiffusionGemmas trained from scratch on 4x4 and 6x6 Sudoku (sudoku/models/)
# solve a puzzle each on the CPU, showing every denoising step, then face their autoregressive twins on 200 puzzles.
demo: $(STAMP)
	$(VENV)/bin/dgemma sudoku 0024000000020300
	$(VENV)/bin/dgemma sudoku 020030000002043210006004350021062003
	$(VENV)/bin/dgemma eval sudoku --size 4 --count 200 --steps 1 4 16 --baseline
	$(VENV)/bin/dgemma eval sudoku --size 6 --count 200 --steps 1 4 16 --baseline

clean:
	rm -rf $(VENV) build dist *.egg-info

# A GPU window (README "GPU check"): `make gpu-check` (at most 6 minutes), then `make gpu-train-sudoku9` (at most 5).
# On the GPU machine they run under the image's python3, with no venv and no network, and make need not exist there:
# the device tool's calls run the same scripts directly (README). DRY=1 runs them on the CPU at tiny shapes with this
# checkout's venv, as the tests do in CI. Results land in GPU_OUT (the device tool's calls write to $OUT instead).
GPU_OUT ?= build/gpu
GPU_PY ?= python3
ifeq ($(DRY),1)
GPU_PY := $(PY)
GPU_DEPS := $(STAMP)
GPU_FLAGS := --dry
endif

gpu-check: $(GPU_DEPS)
	$(GPU_PY) benchmarks/gpu_check.py --out $(GPU_OUT)/check $(GPU_FLAGS)

gpu-train-sudoku9: $(GPU_DEPS)
	$(GPU_PY) benchmarks/gpu_train_sudoku9.py --out $(GPU_OUT)/sudoku9 $(GPU_FLAGS)

# The Python packages the GPU image lacks, as wheels for its Python 3.12 in .whl/ (carried to the machine): the
# transformers the parity tests pin (the image has 5.17, which predates DiffusionGemma) and the regex it requires
# (>= 2025.10.22; the image's version is not recorded). Its other requirements are in the image at versions it takes.
gpu-wheels: $(STAMP)
	rm -rf .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl transformers==5.23.0 regex==2026.11.19

# Appends the rows a GPU window brought back (ROWS=path/to/results.csv) to benchmarks/results/results.csv.
gpu-merge: $(STAMP)
	$(PY) benchmarks/gpu_check.py --merge $(ROWS)
