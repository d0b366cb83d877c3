# AgentPost developer tasks. `make` (or `make help`) lists them.
# Everything runs from the project's own .venv, built from the pinned lock file,
# so a fresh machine (including CI, which runs as root) needs only python3 and make.

SHELL := /bin/bash
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
.SUFFIXES:

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VAR_DIR := var
PYTEST_ARGS ?=
APT_GET := DEBIAN_FRONTEND=noninteractive apt-get -y -q

.PHONY: help venv postgres-bin run test lint bench bench-compare clean distclean deb deb-test man

help:
	@echo "AgentPost make targets:"
	@echo "  make venv          create .venv from requirements-dev.lock (redone when inputs change)"
	@echo "  make postgres-bin  check for PostgreSQL server binaries and mbsync (installs them when root)"
	@echo "  make run           run AgentPost locally against a dev PostgreSQL in ./$(VAR_DIR)"
	@echo "  make test          run the test suite (extra pytest options: PYTEST_ARGS='-k smtp -x')"
	@echo "  make lint          ruff check, then mypy (strict for model/ auth/ core/ storage/)"
	@echo "  make bench         API benchmark (bench/api_bench.py)"
	@echo "  make bench-compare SMTP next to Postfix (bench/compare_smtp.py; BENCH_ARGS=--quick)"
	@echo "  make clean         remove .venv and build/cache artefacts (keeps ./$(VAR_DIR))"
	@echo "  make distclean     clean, delete the dev PostgreSQL cluster(s) and ./$(VAR_DIR)"
	@echo "  make deb           build $(DEB_OUT)/agentpost_<version>_<arch>.deb (dh-virtualenv; Build-Depends via apt when root)"
	@echo "  make deb-test      build, lintian, then install/run/upgrade/purge in a throw-away Debian 12 root (root only)"
	@echo "  make man           write agentpost(8) to build/man/agentpost.8 from the CLI's help"

venv: $(STAMP)

# Rebuilt whenever the pins or the package metadata change.
$(STAMP): $(wildcard requirements-dev.lock pyproject.toml setup.cfg)
	@command -v $(PYTHON) >/dev/null 2>&1 || { \
	  echo "$(PYTHON) not found: AgentPost needs Python >= 3.11 (Debian/Ubuntu: sudo apt-get install python3)" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "AgentPost needs Python >= 3.11, but $(PYTHON) is $$($(PYTHON) -V 2>&1)." \
	       "Install a newer Python or run: make PYTHON=/path/to/python3.11 ..." >&2; exit 1; }
	@test -f requirements-dev.lock || { echo "requirements-dev.lock is missing; cannot build $(VENV)" >&2; exit 1; }
	@if ! $(PYTHON) -c 'import venv, ensurepip' >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Python's venv module is missing; installing python3-venv ..."; \
	    log=$$(mktemp); \
	    { apt-get update -q && $(APT_GET) install python3-venv; } >"$$log" 2>&1 || { cat "$$log" >&2; rm -f "$$log"; exit 1; }; \
	    rm -f "$$log"; \
	    $(PYTHON) -c 'import venv, ensurepip' >/dev/null 2>&1 || { \
	      echo "python3-venv is installed but $(PYTHON) still lacks venv/ensurepip" >&2; exit 1; }; \
	  else \
	    echo "Python's venv module is missing. Install it with: sudo apt-get install python3-venv" >&2; exit 1; \
	  fi; \
	fi
	@if ! $(VPY) -m pip --version >/dev/null 2>&1; then \
	  echo "Creating $(VENV) ..."; rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); \
	fi
	@echo "Installing pinned dependencies into $(VENV) ..."
	@$(VENV)/bin/pip install -q -r requirements-dev.lock
	@$(VENV)/bin/pip install -q --no-deps --config-settings editable_mode=compat -e .
	@touch $@

# Same search as agentpost/dev/embedded_pg.py: `pg_config --bindir`, then the
# distribution's versioned folders, which Debian/Ubuntu keep off PATH.
# Also mbsync (isync), the IMAP client of tests/test_imap_mbsync.py: installed when root
# (so CI always runs those tests); otherwise a notice, and the tests skip themselves.
postgres-bin:
	@have_pg() { \
	  d=$$(pg_config --bindir 2>/dev/null) && [ -x "$$d/initdb" ] && [ -x "$$d/pg_ctl" ] && return 0; \
	  for d in /usr/lib/postgresql/*/bin; do [ -x "$$d/initdb" ] && [ -x "$$d/pg_ctl" ] && return 0; done; \
	  return 1; \
	}; \
	if [ "$$(id -u)" != 0 ]; then \
	  have_pg || { echo "PostgreSQL server binaries not found. Install them with: sudo apt-get install postgresql" >&2; exit 1; }; \
	  command -v mbsync >/dev/null 2>&1 || echo "mbsync not found: tests/test_imap_mbsync.py will be skipped. Install it with: sudo apt-get install isync" >&2; \
	  exit 0; \
	fi; \
	pkgs=""; \
	have_pg || pkgs="postgresql"; \
	[ -x /usr/sbin/runuser ] || command -v runuser >/dev/null 2>&1 || pkgs="$$pkgs util-linux"; \
	command -v mbsync >/dev/null 2>&1 || pkgs="$$pkgs isync"; \
	if [ -n "$$pkgs" ]; then \
	  echo "Installing$$(printf ' %s' $$pkgs) (apt-get; running as root) ..."; \
	  log=$$(mktemp); \
	  { apt-get update -q && $(APT_GET) install $$pkgs; } >"$$log" 2>&1 || { cat "$$log" >&2; rm -f "$$log"; exit 1; }; \
	  rm -f "$$log"; \
	  have_pg || { echo "PostgreSQL server binaries still not found after installing postgresql" >&2; exit 1; }; \
	  command -v mbsync >/dev/null 2>&1 || { echo "mbsync still not found after installing isync" >&2; exit 1; }; \
	fi

run: venv postgres-bin
	$(VPY) -m agentpost.dev.run

# tests/conftest.py starts (and stops) its own throw-away cluster.
test: venv postgres-bin
	$(VPY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: venv postgres-bin
	$(VPY) bench/api_bench.py

# AgentPost's MX next to a private Postfix instance (apt-get install postfix), smtp-source.
bench-compare: venv postgres-bin
	$(VPY) bench/compare_smtp.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VAR_DIR) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

# The dev clusters are deleted (not just stopped): when root they live outside
# ./var, in /var/tmp, and would otherwise be silently reused by the next `make run`.
# The module is stdlib-only, so the system Python will do if .venv is gone.
distclean:
	@py=$(VPY); [ -x "$$py" ] || py=$(PYTHON); \
	for pointer in $(VAR_DIR)/*.json; do \
	  [ -f "$$pointer" ] || continue; \
	  name=$$(basename "$$pointer" .json); \
	  echo "Stopping and deleting dev PostgreSQL cluster '$$name' ..."; \
	  "$$py" -m agentpost.dev.embedded_pg destroy --var-dir $(VAR_DIR) --name "$$name" || true; \
	done
	@$(MAKE) --no-print-directory clean
	rm -rf $(VAR_DIR)

# Debian package (see debian/, packaging/ and docs/operations.md).
DEB_OUT ?= dist

deb:
	packaging/build-deb $(DEB_OUT)

# Builds first; needs root (debootstrap, chroot). Leaves nothing behind on this machine.
deb-test: deb
	packaging/deb-test $(DEB_OUT)

man: venv
	@mkdir -p build/man
	$(VPY) packaging/manpage.py > build/man/agentpost.8
	@echo "read it with: man -l build/man/agentpost.8"
