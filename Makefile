# Two entry points: `make demo` (set up, then segment a CT with the default model) and
# `make test` (set up, then run the test suite). Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-triton36 lint

setup: $(STAMP)

# The CPU build of torch first: a bare `torch` requirement would fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 triton==3.8.0 "numpy<2.4"
	$(PY) -m pip install -q -e ".[dev,dicom,cluster]"
	touch $(STAMP)

demo: setup
	$(PY) -m fastcascade.demo --out out

# Interpreter tests and the sm_90 compile checks cannot share a process (TRITON_INTERPRET).
test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q --durations=15 -m "not compile"
	FASTCASCADE_TEST_COMPILE=1 $(PY) -m pytest -q --durations=5 -m compile -p no:cacheprovider; \
	  rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]
	$(MAKE) --no-print-directory test-triton36

# The GPU machines have Triton 3.6: the kernels' interpreter tests and sm_90 compile checks
# again with it, in a venv of its own. Where Triton 3.6 cannot be installed (no registry),
# this says so and passes; a failing test fails.
VENV36 ?= .venv-triton36
PY36 := $(VENV36)/bin/python
KERNEL_TESTS := tests/test_ops_conv_bn_relu_kernel.py tests/test_ops_conv_bn_relu_reference.py \
  tests/test_ops_conv_bn_relu_dispatch.py tests/test_ops_conv_bn_relu_table.py \
  tests/test_ops_warp.py tests/test_ops_dilate.py tests/test_ops_stitch.py \
  tests/test_ops_stitch_triton.py tests/test_ops_backend.py

test-triton36:
	@if [ ! -f $(VENV36)/.installed ]; then \
	  python3 -m venv $(VENV36) && $(PY36) -m pip install -q --upgrade pip && \
	  $(PY36) -m pip install -q torch==2.13.0 triton==3.6.0 "numpy<2.4" && \
	  $(PY36) -m pip install -q -e ".[dev]" && touch $(VENV36)/.installed || \
	  { echo "test-triton36: SKIPPED, Triton 3.6.0 could not be installed"; rm -rf $(VENV36); }; \
	fi
	@if [ -f $(VENV36)/.installed ]; then \
	  $(PY36) -c "import triton; print('Triton', triton.__version__)" && \
	  TRITON_INTERPRET=1 $(PY36) -m pytest -q -p no:cacheprovider -m "not compile" $(KERNEL_TESTS) && \
	  FASTCASCADE_TEST_COMPILE=1 $(PY36) -m pytest -q -p no:cacheprovider -m compile; \
	fi

lint: setup
	$(VENV)/bin/ruff check fastcascade tests benchmarks
