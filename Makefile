# Two entry points: `make demo` (set up, then segment a CT with the default model) and
# `make test` (set up, then run the test suite). Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint

setup: $(STAMP)

# The CPU build of torch first: a bare `torch` requirement would fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 triton==3.8.0 "numpy<2.4"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(PY) -m fastcascade.demo --out out

# Interpreter tests and the sm_90 compile checks cannot share a process (TRITON_INTERPRET).
test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q --durations=15 -m "not compile"
	FASTCASCADE_TEST_COMPILE=1 $(PY) -m pytest -q --durations=5 -m compile -p no:cacheprovider; \
	  rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

lint: setup
	$(VENV)/bin/ruff check fastcascade tests benchmarks
