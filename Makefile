# finetune: make install | run | test | bench
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test test-all bench bench-speed bench-transfer clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -e ".[test]"

# the main job on the embedded default: EfficientNet-Lite0 ImageNet weights, synthetic data, offline
run: install
	$(BIN)/finetune train

test:
	$(BIN)/python -m pytest -q

test-all:
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: bench-speed bench-transfer

bench-speed:
	$(BIN)/python scripts/bench_speed.py --quick

bench-transfer:
	$(BIN)/python scripts/bench_transfer.py

clean:
	rm -rf outputs multirun bench_out .pytest_cache build dist *.egg-info
