# flux2-remote: `make demo` and `make test` work on a fresh machine.
# Each target installs what it needs into .venv first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch 2.13.0 is what these machines carry; a CUDA machine
# gets the matching CUDA build of the same version from PyPI.
TORCH_SPEC ?= torch==2.13.0
PROTOS := $(shell find proto -name '*.proto')
STAMP  := $(VENV)/.installed

.PHONY: install proto test demo serve bench clean

install: $(STAMP) proto

# Every extra of pyproject.toml: this checkout serves, generates, trains and tests.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[server,client,training,test]'
	@touch $(STAMP)

# Stubs are generated, never edited; git ignores them.
proto: $(STAMP) $(PROTOS)
	$(BIN)/python -m common.protogen

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: install
	$(BIN)/python -m dit_client.demo

bench: install
	$(BIN)/python benchmarks/encoder_forward.py
	$(BIN)/python benchmarks/wire.py

clean:
	find proto -name '*_pb2*.py*' -delete
	rm -rf $(VENV) *.egg-info
