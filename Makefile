# Everything runs inside a local virtual environment that the targets create.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PREFIX ?= /usr/local
DESTDIR ?=
UNITDIR ?= $(PREFIX)/lib/systemd/system

.PHONY: all setup setup-test run test lint bench bench-tools install clean

all: test

# The venv with what the programs need; the test tools come on top of it,
# only for the targets that use them (the demo does not need them).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cbor]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,cbor]'
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

# The main job: the demo stack with the embedded pong service.
# DEMO_ARGS: e.g. make run DEMO_ARGS="--tcp-port 9100 --ws-port 8180"
run: setup
	$(PY) -m daemons.demo $(DEMO_ARGS)

# Lint, types (mypy: --strict for ipc_core, see pyproject.toml), then every
# test with coverage, daemons in subprocesses included; under the floor in
# pyproject.toml ([tool.coverage.report] fail_under) the run fails.
test: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy ipc_core daemons
	rm -f .coverage .coverage.*
	$(PY) -m pytest -q --cov --cov-report=

lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench-tools:
	$(MAKE) -C bench/c

# BENCH_ARGS: e.g. make bench BENCH_ARGS="--quick --only core"
bench: setup-test bench-tools
	$(PY) -c 'import matplotlib, uvicorn, httptools' 2>/dev/null || $(PY) -m pip install -q -e '.[bench]' \
		|| echo "the bench extra (matplotlib, uvicorn, httptools) could not be installed: no chart, no uvicorn rows"
	$(PY) -m bench.run $(BENCH_ARGS)

# The units name their programs as /usr/local/bin/...; they are rewritten to
# BINDIR, where the LibIPC commands are (e.g. BINDIR=/opt/libipc/bin for a
# venv). See docs/deployment.md.
BINDIR ?= $(PREFIX)/bin

install:
	install -d $(DESTDIR)$(UNITDIR)
	for unit in systemd/*.service systemd/*.socket; do \
		sed 's|/usr/local/bin/|$(BINDIR)/|g' "$$unit" > "$(DESTDIR)$(UNITDIR)/$${unit#systemd/}" && \
		chmod 0644 "$(DESTDIR)$(UNITDIR)/$${unit#systemd/}" || exit 1; \
	done
	install -d $(DESTDIR)$(PREFIX)/lib/sysusers.d $(DESTDIR)$(PREFIX)/lib/tmpfiles.d
	install -m 0644 systemd/libipc.sysusers $(DESTDIR)$(PREFIX)/lib/sysusers.d/libipc.conf
	install -m 0644 systemd/libipc.tmpfiles $(DESTDIR)$(PREFIX)/lib/tmpfiles.d/libipc.conf

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	-$(MAKE) -C bench/c clean
