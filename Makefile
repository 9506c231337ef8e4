# The two commands of the README: `make up` (run the stack) and `make test` (run the tests).
# Both create .venv when missing and reinstall only when pyproject.toml or constraints.txt change.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
MINUTES ?= 30

.PHONY: up test install browser soak bench lint clean-data

up: install
	$(BIN)/tickcast up

test: install browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel

# torch first, pinned: a bare torch requirement would pull GBs of CUDA wheels.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[cpu,train,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# Debian's Chromium for the dashboard's browser tests (never a test tool's own browser download).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	    || echo "could not install chromium: browser tests will be skipped"; \
	  else echo "chromium missing and not root: browser tests will be skipped"; fi; fi

soak: install
	$(BIN)/tickcast soak --minutes $(MINUTES) $(if $(DEPTH),--depth $(DEPTH))

bench: install
	$(BIN)/tickcast bench

lint: install
	$(BIN)/ruff check .
