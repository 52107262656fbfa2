# Set-up and checks on a fresh Debian machine (root or sudo). `make test` and `make up` do all set-up.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
# The console script once installed; before that (fresh machine) the same CLI through the interpreter.
ZENITH ?= $(shell command -v zenith 2>/dev/null || echo "$(PYTHON) -c 'from deploy.cli import main; main()'")
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
SETUP_STAMP := .zenith/.setup-stamp

.PHONY: help setup system-packages python-packages test up down lint

help:
	@echo "make setup   install redis-server/redis-cli/Java/Maven if missing, the package, and the Kafka jars"
	@echo "make test    setup, then the test suite (real Kafka broker and redis-server)"
	@echo "make up      setup, then the main job (zenith up)"
	@echo "make down    stop the local stack (zenith infra down)"
	@echo "make lint    ruff"

setup: system-packages python-packages
	$(ZENITH) infra fetch

# Only what is missing, so a second run asks apt nothing.
system-packages:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null 2>&1 || missing="$$missing redis-tools"; \
	command -v java >/dev/null 2>&1 || missing="$$missing openjdk-17-jre-headless"; \
	command -v mvn >/dev/null 2>&1 || missing="$$missing maven"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(APT) update && $(APT) install -y --no-install-recommends $$missing; \
	  case "$$missing" in *redis-server*) \
	    $(SUDO) service redis-server stop >/dev/null 2>&1 || true;; esac; \
	fi
# (The packaged redis service is stopped again: the project runs its own redis-server on its own port.
# redis-cli, from redis-tools, forms the test Redis Cluster; redis-server depends on it, but check anyway.)

# Re-run pip only when pyproject.toml changed or the package is not importable.
python-packages:
	@if [ ! -f $(SETUP_STAMP) ] || [ pyproject.toml -nt $(SETUP_STAMP) ] \
	    || ! $(PYTHON) -c 'import importlib.metadata as m; m.version("zenith-live")' >/dev/null 2>&1; then \
	  $(PYTHON) -m pip install -q -e '.[dev]' && mkdir -p $(dir $(SETUP_STAMP)) && touch $(SETUP_STAMP); \
	fi

test: setup
	$(PYTHON) -m pytest -q

# e.g. make up UP_ARGS="--duration 300 --requests-per-s 40"
UP_ARGS ?=
up: setup
	$(ZENITH) up $(UP_ARGS)

down:
	$(ZENITH) infra down

lint:
	$(PYTHON) -m ruff check .
