# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-quick test bench clean

setup: $(STAMP)

# torch==2.13.0 first: the CPU build on disk, so the range in pyproject installs nothing larger.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

demo: setup
	$(BIN)/vlmprune demo --out demo-report

demo-quick: setup
	$(BIN)/vlmprune demo --quick --out demo-report

test: setup
	$(BIN)/python -m pytest tests

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo-report .pytest_cache
