# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LATEST := .venv-latest

.PHONY: setup demo demo-quick test test-latest bench clean

setup: $(STAMP)

# Everything through constraints.txt: the exact versions the tests passed on. torch==2.13.0 there is
# the CPU build on disk; installing it first keeps the package's range from pulling a larger build.
$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt pip
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[test,lmms,export]"
	# lmms-eval requires torchvision, whose PyPI build needs the CUDA torch: next to the CPU torch it breaks
	# transformers' model imports, and nothing vlmprune runs through lmms-eval uses it.
	$(BIN)/python -c "import torch, sys; sys.exit(torch.version.cuda is None)" || $(BIN)/pip uninstall -q -y torchvision
	touch $(STAMP)

demo: setup
	$(BIN)/vlmprune demo --out demo-report

demo-quick: setup
	$(BIN)/vlmprune demo --quick --out demo-report

test: setup
	$(BIN)/python -m pytest tests

# The newest release of every direct dependency, no constraints and no upper bounds, in a separate
# environment: finds the next breaking release. Not part of CI; record the result in the README.
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q --upgrade $$($(PY) tools/dependency_names.py)
	$(LATEST)/bin/pip install -q --no-deps -e .
	$(LATEST)/bin/python -c "import torch, sys; sys.exit(torch.version.cuda is None)" || $(LATEST)/bin/pip uninstall -q -y torchvision
	$(LATEST)/bin/pip list 2>/dev/null | grep -iE '^(torch|torchvision|transformers|safetensors|tokenizers|numpy|lmms.eval|compressed.tensors|peft|filelock) '
	$(LATEST)/bin/python -m pytest tests

# The speed set (benchmarks/speed.py SUITE), its tables written into docs/BENCHMARKS.md from the JSON.
bench: setup
	$(BIN)/python benchmarks/speed.py --suite --markdown docs/BENCHMARKS.md

clean:
	rm -rf $(VENV) $(LATEST) demo-report .pytest_cache
