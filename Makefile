# finetune: make install | run | test | bench
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test test-all bench bench-speed bench-transfer clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# reinstalls only when pyproject.toml changes
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[test,sweep,export,tensorboard]"
	touch $@

install: $(VENV)/.installed

# the main job on the embedded default: EfficientNet-Lite0 ImageNet weights, the embedded digits, offline
run: $(VENV)/.installed
	$(BIN)/finetune train

# installs first: `make test` works as the first command on a fresh clone
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test-all: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: bench-speed bench-transfer

bench-speed:
	$(BIN)/python scripts/bench_speed.py --quick

bench-transfer:
	$(BIN)/python scripts/bench_transfer.py

clean:
	rm -rf outputs multirun bench_out .pytest_cache build dist *.egg-info
