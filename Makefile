# finetune: make install | run | test | bench
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test test-fast docs bench bench-speed bench-transfer clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# reinstalls only when pyproject.toml changes
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[test,sweep,export,tensorboard,docs,hf,peft,data,trackers]"
	touch $@

install: $(VENV)/.installed

# the main job on the embedded default: EfficientNet-Lite0 ImageNet weights, the embedded digits, offline
# make run ARGS="model=resnet18 unfreeze=5": any command line (or `source .venv/bin/activate`, then finetune ...)
run: $(VENV)/.installed
	$(BIN)/finetune train $(ARGS)

# one test worker per core (pytest-xdist); a module marked xdist_group stays on one worker (its fixture trains once)
PYTEST := $(BIN)/python -m pytest -q -n auto --dist loadgroup

# installs first: `make test` works as the first command on a fresh clone; every test
test: $(VENV)/.installed
	$(PYTEST)

# the edit loop: without the heavy end-to-end tests (torchrun, plugin sweeps, benchmarks, CLI subprocesses)
test-fast: $(VENV)/.installed
	$(PYTEST) -m "not slow"

# the documentation site (mkdocs-material): the configuration reference regenerated from the schema, then the
# site built into build/site, failing on a broken link (`$(BIN)/mkdocs serve` serves it while you edit)
docs: $(VENV)/.installed
	$(BIN)/python -m finetune.config.reference -o docs/reference.md
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: bench-speed bench-transfer

bench-speed:
	$(BIN)/python scripts/bench_speed.py --quick

bench-transfer:
	$(BIN)/python scripts/bench_transfer.py

clean:
	rm -rf outputs multirun bench_out .pytest_cache build dist *.egg-info
