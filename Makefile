# The two commands of the README: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: install test lint typecheck pytest demo bench proto clean

install: $(STAMP)

# torch comes first and pinned: any other spec would pull the CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check tandem edge cloud sim federated tests bench proto examples
	$(BIN)/ruff format --check tandem edge cloud sim federated tests bench proto examples
	$(BIN)/python tests/import_contract.py

typecheck: $(STAMP)
	$(BIN)/mypy tandem

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck pytest

demo: $(STAMP)
	$(BIN)/tandem demo

bench: $(STAMP)
	$(BIN)/python bench/codec.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/sim.py
	$(BIN)/python bench/adapters.py
	$(BIN)/python bench/fed.py
	$(BIN)/python bench/head.py

# Regenerate tandem/wire/v1 from proto/tandem/v1; tests/test_wire.py fails while they differ.
proto: $(STAMP)
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
