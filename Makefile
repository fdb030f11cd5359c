# The two commands a fresh machine needs: `make dev` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

# Every direct and transitive dependency, pinned with hashes: a fresh machine installs
# exactly what CI tested, whatever was released since. pyproject.toml keeps the ranges.
LOCK := requirements/dev.lock
RUNTIME_LOCK := requirements/runtime.lock
LOCK_VENV := .venv-lock
PIP_TOOLS := pip-tools==7.6.2
# torch 2.13.0 is the CPU build (requirements/constraints.in); the index and local wheel
# directories come from pip's own configuration, never from the lock file.
LOCK_FLAGS := --quiet --generate-hashes --allow-unsafe --strip-extras \
	--no-emit-index-url --no-emit-find-links --build-deps-for wheel \
	-c requirements/constraints.in

.PHONY: install dev test test-fast bench lock lock-upgrade

$(PY):
	python3 -m venv $(VENV)

# The lock (torch among it, CPU build) first; then the project itself, built with the
# locked hatchling and without pulling anything else.
install: $(PY)
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation .
	$(PY) -m pip check

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

# Re-lock after editing pyproject.toml: new requirements are resolved, pins that still
# satisfy it stay. `make lock-upgrade` moves every pin to the newest release allowed.
lock: $(LOCK_VENV)/bin/pip-compile
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile $(LOCK_FLAGS) $(UPGRADE) -o $(RUNTIME_LOCK) pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile $(LOCK_FLAGS) $(UPGRADE) --extra dev -c $(RUNTIME_LOCK) \
	  -o $(LOCK) pyproject.toml

lock-upgrade:
	$(MAKE) lock UPGRADE=--upgrade

$(LOCK_VENV)/bin/pip-compile:
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet $(PIP_TOOLS)
