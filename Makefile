# Two commands on a fresh machine: `make run` and `make test`. Each creates the venv.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test test-docker clean

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

clean:
	rm -rf $(VENV) runs
