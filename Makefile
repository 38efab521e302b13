# Two commands on a fresh machine: `make run` and `make test`. Each creates the venv.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test test-fast test-docker mutation federation federation-run federation-down federation-flwr clean

venv: $(STAMP)

# pip, not uv: pip takes torch 2.14.1 / torchvision 0.29.1 from this machine's disk.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/dpfl simulate

test: $(STAMP)
	$(BIN)/python -m pytest

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
	rm -rf $(VENV) runs build/mutation
