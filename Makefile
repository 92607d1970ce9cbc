# One-command setup: every target creates .venv when it is missing and installs the package into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: test lint format test-avx2 test-fast demo bench clean

# the numerics-heavy modules, run a second time with PyTorch's and oneDNN's kernels forced to AVX2 and one thread
# per process: an AVX-512 Xeon then catches what an AVX2-only EPYC would (CI runs on either kind), and CI covers
# both thread settings users and CI machines run with
NUMERICS := tests/test_losses.py tests/test_backbone.py tests/test_winograd.py tests/test_detector.py \
	tests/test_weights_torchvision.py tests/test_fastpath.py tests/test_inference_files.py \
	tests/test_inference_predictor.py

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pair that installs from this machine's disk (a CUDA build that also runs on the CPU).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# the formatter and the linter first (line length 120): a file ruff would change fails the run; `make format` fixes it
LINTED := src tests benchmarks

test: $(STAMP)
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-avx2

lint: $(STAMP)
	$(PY) -m ruff format --check --diff $(LINTED)
	$(PY) -m ruff check $(LINTED)

format: $(STAMP)
	$(PY) -m ruff format $(LINTED)
	$(PY) -m ruff check --fix $(LINTED)

test-avx2: $(STAMP)
	OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q -m "not slow" $(NUMERICS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/retinanet demo --output runs/demo

# the benchmarks' extras: OpenVINO rows and SAHI, the sliced-inference library the tiled path is compared with
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
