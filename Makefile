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

.PHONY: install proto redis-server test test-slow lint fmt types demo demo-klein serve bench clean

install: $(STAMP) proto redis-server

# Every extra of pyproject.toml: this checkout serves, generates, trains and tests.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[server,client,training,test]'
	@touch $(STAMP)

# A Redis-compatible server for the tests that start their own (tests/redis_server.py:
# a free loopback port, no persistence). Debian's package when none is on PATH; as root
# only, and without starting the package's own service: a policy-rc.d that forbids it
# stands in for the install when the machine has none (Docker images have one already).
redis-server:
	@if command -v redis-server >/dev/null 2>&1; then \
	  echo "redis-server: $$(command -v redis-server)"; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "make install: no redis-server on PATH, and the Redis-backed tests need one: install Debian/Ubuntu's package as root ('sudo apt-get install --no-install-recommends redis-server'), or put any Redis or Valkey 7+ server on PATH as redis-server"; \
	else \
	  made=; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then \
	    printf '#!/bin/sh\n# made by flux2-remote make install: do not start services\nexit 101\n' > /usr/sbin/policy-rc.d && \
	    chmod 755 /usr/sbin/policy-rc.d && made=1; \
	  fi; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server; \
	  status=$$?; \
	  if [ -n "$$made" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
	  if [ $$status -ne 0 ]; then echo "make install: apt-get could not install redis-server (exit $$status)"; exit $$status; fi; \
	  echo "redis-server: $$(command -v redis-server || echo /usr/bin/redis-server) (Debian's package; its service was not started)"; \
	fi

# Stubs are generated, never edited; git ignores them.
proto: $(STAMP) $(PROTOS)
	$(BIN)/python -m common.protogen

# Lint and types first (seconds; they fail on what review would catch), then the tests
# on every core (pytest-xdist). Tests marked slow (whole processes, benchmark dry runs,
# fidelity over many batches) run in `make test-slow`; CI runs both (.ci/run).
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider -n auto --dist worksteal

test: install lint types
	$(PYTEST) -m "not slow"

test-slow: install
	$(PYTEST) -m slow

# ruff's settings are in pyproject.toml ([tool.ruff]); `make fmt` applies what `make lint` checks.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# mypy over common, encoder_server and dit_client ([tool.mypy] in pyproject.toml).
types: install
	$(BIN)/mypy

demo: install
	$(BIN)/python -m dit_client.demo

# FLUX.2 [klein] end to end: ONE encoder serving both demo models (--model dev=demo
# --model klein=demo-klein); the client picks the klein one from the DiT's pipeline.
demo-klein: install
	$(BIN)/python -m dit_client.demo --klein

bench: install
	$(BIN)/python benchmarks/encoder_forward.py
	$(BIN)/python benchmarks/wire.py

clean:
	find proto -name '*_pb2*.py*' -delete
	rm -rf $(VENV) *.egg-info
