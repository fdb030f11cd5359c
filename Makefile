# The two commands a fresh machine needs: `make dev` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: install dev test test-fast bench

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, pinned: 2.13.0 is the CPU build; anything else pulls a multi-GB CUDA build.
install: $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet ".[dev]"

dev: install
	$(VENV)/bin/routemesh dev

# pytest's exit code 5 means it collected no tests: that is a failure, never a pass.
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/routemesh contracts check contracts/schemas
	$(PY) -m pytest; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The subset that needs no broker.
test-fast: install
	$(PY) -m pytest -m "not broker and not model"

bench: install
	$(PY) bench/contracts.py
