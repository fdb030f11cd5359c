# The two commands a fresh machine needs: `make dev` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

# Every direct and transitive dependency, pinned with hashes: a fresh machine installs
# exactly what CI tested, whatever was released since. pyproject.toml keeps the ranges.
LOCK := requirements/dev.lock
RUNTIME_LOCK := requirements/runtime.lock
BUILD_LOCK := requirements/build.lock
BOOTSTRAP_LOCK := requirements/bootstrap.lock
LOCK_VENV := .venv-lock
PIP_TOOLS := pip-tools==7.6.2
# torch 2.13.0 is the CPU build (requirements/constraints.in); the index and local wheel
# directories come from pip's own configuration, never from the lock file.
HASH_FLAGS := --quiet --generate-hashes --allow-unsafe --strip-extras \
	--no-emit-index-url --no-emit-find-links
LOCK_FLAGS := $(HASH_FLAGS) --build-deps-for wheel -c requirements/constraints.in

.PHONY: install dev test test-fast bench lock lock-upgrade image

$(PY):
	python3 -m venv $(VENV)

# No resolver at install time: pip's resolver consults the index even over a complete
# lock and refuses in hash mode when a dependency released a version since. So: the
# pinned pip first (whatever pip `venv` ships), then the lock (torch among it, CPU build)
# with --no-deps, then the project built with the locked hatchling, then `pip check`,
# which fails loudly if the lock misses a dependency instead of fetching one.
INSTALL := $(PY) -m pip install --quiet --no-deps
install: $(PY)
	$(INSTALL) --require-hashes -r $(BOOTSTRAP_LOCK)
	$(INSTALL) --require-hashes -r $(LOCK)
	$(INSTALL) --no-build-isolation .
	$(PY) -m pip check

dev: install
	$(VENV)/bin/routemesh dev

# pytest's exit code 5 means it collected no tests: that is a failure, never a pass.
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/routemesh contracts check contracts/schemas
	$(PY) -m pytest; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The subset that needs no broker.
test-fast: install
	$(PY) -m pytest -m "not broker and not model"

# The image, on a machine without registry access too (deploy/build/image.sh says how).
image:
	deploy/build/image.sh

bench: install
	$(PY) bench/contracts.py

# Re-lock after editing pyproject.toml: new requirements are resolved, pins that still
# satisfy it stay. `make lock-upgrade` moves every pin to the newest release allowed.
lock: $(LOCK_VENV)/bin/pip-compile
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile $(HASH_FLAGS) $(UPGRADE) \
	  -o $(BOOTSTRAP_LOCK) requirements/bootstrap.in
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile $(LOCK_FLAGS) $(UPGRADE) -o $(RUNTIME_LOCK) pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile $(LOCK_FLAGS) $(UPGRADE) --extra export --extra embedded -c $(RUNTIME_LOCK) \
	  -o $(BUILD_LOCK) pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile $(LOCK_FLAGS) $(UPGRADE) --extra dev -c $(BUILD_LOCK) \
	  -o $(LOCK) pyproject.toml

lock-upgrade:
	$(MAKE) lock UPGRADE=--upgrade

$(LOCK_VENV)/bin/pip-compile:
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet $(PIP_TOOLS)
