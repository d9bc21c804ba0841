# `make run` serves on 127.0.0.1:8090 with ./pb_data; `make test` runs the whole suite;
# `make soak` runs the randomised crash tests for hundreds of rounds;
# `make bench` compares backup, restore, upload and download with PocketBase's on the same data
# (bench/compare.py); `make bench-s3` measures the server's memory on S3 (bench/s3_memory.py).
# Both take BENCH_ARGS, e.g. --scale 0.05 for a quick look; `make bench` runs every phase
# BENCH_RUNS times (3) and prints the medians, then a partial restore against the full one
# (bench/partial.py, PARTIAL_ARGS).
# `make bench-api` runs wrk against ours and PocketBase on the same records (bench/api.py), e.g.
# BENCH_ARGS="--seconds 3 --runs 1" for a quick look; it installs wrk (apt-get) when it can.
# Each installs what it needs into .venv (and tests/e2e/node_modules) first.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HTTP   ?= 127.0.0.1:8090
DIR    ?= ./pb_data

.PHONY: bytecode run test soak bench bench-s3 bench-api bench-catalog bench-encryption bench-replication wrk chromium age install install-test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

tests/e2e/node_modules/.installed: tests/e2e/package.json tests/e2e/package-lock.json
	cd tests/e2e && npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.installed

# $(call apt_install,COMMAND,WHO): a Debian package the project needs (named as its command),
# installed with apt-get when missing and running as root, else a clear message and a failure.
define apt_install
@command -v $(1) >/dev/null 2>&1 || { \
  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
    apt-get install -y $(1) || { apt-get update && apt-get install -y $(1); }; \
  else \
    echo "$(1) is needed by $(2): install it, e.g. 'sudo apt-get install -y $(1)' on Debian/Ubuntu" >&2; exit 1; \
  fi; }
endef

install-test: $(VENV)/.installed-test tests/e2e/node_modules/.installed chromium age

# Debian's Chromium, which the dashboard's browser tests drive headless (playwright-core, no browser
# download).
chromium:
	$(call apt_install,chromium,the dashboard tests)

# age (the encryption tests decrypt our backups with the real tool, and restore what it made).
age:
	$(call apt_install,age,the encryption tests)

# The server's bytecode, written ahead: where PYTHONDONTWRITEBYTECODE is set (as on this project's
# machines), Python would otherwise compile every module of server/ at each start, and a
# restore's re-exec is a start (0.57 s of imports instead of 0.33 s, measured). Only changed
# files are compiled again; a stale .pyc is never used (Python checks the source's mtime).
bytecode: install
	@$(PY) -m compileall -q server

run: install bytecode
	$(PY) -m server serve --http $(HTTP) --dir $(DIR)

# Two pytest workers (pytest-xdist): most of a test's time is a server process starting or waiting,
# so the suite takes about half the time on 2 cores. `--dist loadfile`: a module's tests stay
# together on one worker, in order (several share one server, or a browser session, per module).
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: install-test bytecode
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The randomised crash tests (SIGKILL at random moments of backups and restores), hundreds of
# rounds instead of the few `make test` runs, and hypothesis with many more examples.
soak: install-test bytecode
	PB_SOAK=1 $(PY) -m pytest -q -m soak $(PYTEST_ARGS)

BENCH_RUNS ?= 3

bench: $(VENV)/.installed-test bytecode
	$(PY) -m bench.compare --runs $(BENCH_RUNS) $(BENCH_ARGS)
	$(PY) -m bench.partial --runs $(BENCH_RUNS) $(PARTIAL_ARGS)

# The catalog's latencies: the list with 1,000 backups and info of a backup with 10,000 entries, local and S3.
bench-catalog: $(VENV)/.installed-test bytecode
	$(PY) -m bench.catalog $(BENCH_ARGS)

# Encrypted backups and restores against plain ones (issue 17), the same server and data.
bench-encryption: $(VENV)/.installed-test bytecode
	$(PY) -m bench.encryption --runs $(BENCH_RUNS) $(BENCH_ARGS)

# `make bench-replication`: replication on/off/sync vs Litestream beside us (bench/replication.py).
bench-replication: $(VENV)/.installed-test bytecode
	$(PY) -m bench.replication $(BENCH_ARGS)

bench-s3: $(VENV)/.installed-test bytecode
	$(PY) -m bench.s3_memory $(BENCH_ARGS)

# wrk (the HTTP load generator of bench-api).
wrk:
	$(call apt_install,wrk,make bench-api (an HTTP load generator))

bench-api: $(VENV)/.installed-test bytecode wrk
	$(PY) -m bench.api $(BENCH_ARGS)

clean:
	rm -rf $(VENV) tests/e2e/node_modules .pytest_cache
