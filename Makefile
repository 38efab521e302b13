# Two commands on a fresh machine: `make run` and `make test`. Each creates the venv.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test test-docker federation federation-run federation-down federation-flwr clean

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

test-docker: $(STAMP)
	$(BIN)/python -m pytest -m docker tests/test_docker_federation.py

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
	rm -rf $(VENV) runs
