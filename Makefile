# Two commands on a fresh machine: `make run` and `make test`. Each creates the venv.
# The newest supported Python on PATH (3.13, 3.12 or 3.11: scripts/find-python); `make PYTHON=python3.12 ...` picks one.
PYTHON ?= $(shell scripts/find-python)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test test-fast test-second-python test-docker mutation federation federation-run federation-down federation-flwr clean

venv: $(STAMP)

# pip, not uv: pip takes torch 2.14.1 / torchvision 0.29.1 from this machine's disk. A venv
# made by another Python version than $(PYTHON) is made anew.
$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "no Python 3.11, 3.12 or 3.13 found on PATH; install one, or give make PYTHON=/path/to/python3.X"; exit 2; }
	@if [ -x $(BIN)/python ] && [ "$$($(BIN)/python -c 'import sys; print(sys.version_info[:2])')" != "$$($(PYTHON) -c 'import sys; print(sys.version_info[:2])')" ]; then \
	  echo "$(VENV) was made by another Python than $(PYTHON): making it anew"; rm -rf $(VENV); fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/dpfl simulate

# The whole suite, then the fast suite on a second supported Python where the machine has one.
test: $(STAMP)
	$(BIN)/python -m pytest
	$(MAKE) test-second-python

# The fast suite on another supported Python version than $(VENV)'s, in its own venv
# (.venv-second), when one is found on PATH or among pyenv's installs (scripts/find-python).
SECOND_PYTHON ?= $(shell scripts/find-python --other $(PYTHON))
test-second-python:
	@if [ -n "$(SECOND_PYTHON)" ]; then $(MAKE) VENV=.venv-second PYTHON=$(SECOND_PYTHON) test-fast; \
	 else echo "test-second-python: no second Python 3.11-3.13 on this machine; skipped"; fi

# Unit tests only (nothing through a subprocess, Flower or Docker), for the edit-test
# loop; CI runs `make test`. See docs/testing.md.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not docker and not cli"

test-docker: $(STAMP)
	$(BIN)/python -m pytest -m docker tests/test_docker_federation.py

# Mutation testing of privacy/ and client/training.py with mutmut ([tool.mutmut] in
# pyproject.toml; docs/testing.md says how to read it). mutmut names a mutant by its
# file's path and matches that against the running module's name, so the package
# (the repo root, installed as `dpfl`) is staged as src/dpfl with the tests beside it.
MUTATION_DIR := build/mutation
mutation: $(STAMP)
	rm -rf $(MUTATION_DIR) && mkdir -p $(MUTATION_DIR)/src/dpfl
	git ls-files -z --cached --others --exclude-standard -- . ':!tests' | xargs -0 cp --parents -t $(MUTATION_DIR)/src/dpfl
	cp -r tests pyproject.toml $(MUTATION_DIR)
	cd $(MUTATION_DIR) && OMP_NUM_THREADS=1 $(CURDIR)/$(BIN)/mutmut run; \
	  status=$$?; $(CURDIR)/$(BIN)/mutmut export-cicd-stats && cat mutants/mutmut-cicd-stats.json; exit $$status

# The docker federation (docker/federation.py; docs/docker.md). RUN_CONFIG overrides
# the example job's run config, e.g. make federation-run RUN_CONFIG="num-server-rounds=3".
federation: $(STAMP)
	$(BIN)/python docker/federation.py up

federation-run: $(STAMP)
	$(BIN)/python docker/federation.py run --run-config "$(RUN_CONFIG)"

federation-down: $(STAMP)
	$(BIN)/python docker/federation.py down

# Flower's CLI against the federation, e.g. make federation-flwr ARGS="list"
federation-flwr: $(STAMP)
	$(BIN)/python docker/federation.py flwr $(ARGS)

clean:
	rm -rf $(VENV) .venv-second runs build/mutation
