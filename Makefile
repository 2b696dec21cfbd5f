# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick test lint typecheck protos protos-check system-deps clean

# Reinstall only when the dependency list changes; the package itself is an editable install.
$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and exactly: the CPU wheel lies on disk, anything else would pull a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,bench,postgres]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/zkunlearn demo

demo-quick: $(STAMP)
	$(BIN)/zkunlearn demo --quick

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tools/importlint.py

typecheck: $(STAMP)
	$(BIN)/python tools/typecheck.py

protos: $(STAMP)
	$(BIN)/python tools/protogen.py

protos-check: $(STAMP)
	$(BIN)/python tools/protogen.py --check

# The state layer's tests run against a real PostgreSQL server started on loopback by the tests.
system-deps:
	@if ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "PostgreSQL server binaries are missing: install the postgresql package" >&2; exit 1; fi

test: system-deps lint typecheck protos-check
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .cache build dist *.egg-info demo-report
