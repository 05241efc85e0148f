# tokensend: `make demo` runs the suite end to end, `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
PROTOS := $(shell find protos -name '*.proto')
STUBS_STAMP := libs/stubs/.generated

.PHONY: readme-settings install stubs redis lint lint-protos test test-unit test-integration demo bench clean

install: $(VENV)/.installed $(BUF) $(STUBS_STAMP)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# The generated stubs are the top-level `tokensend` package, kept in libs/stubs.
	echo "$(CURDIR)/libs/stubs" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tokensend-stubs.pth
	touch $@

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Generated stubs are rebuilt from protos/ and never committed.
$(STUBS_STAMP): $(PROTOS) $(VENV)/.installed scripts/gen-stubs.sh
	PY=$(PY) scripts/gen-stubs.sh
	touch $@

stubs: $(STUBS_STAMP)

redis:
	scripts/ensure-redis.sh

lint: install
	$(PY) -m ruff check libs services sandbox tests cli bench
	$(PY) -m ruff format --check libs services sandbox tests cli bench

lint-protos: $(BUF)
	$(BUF) lint
	$(BUF) format --diff --exit-code

test: install redis lint-protos lint
	$(PY) -m pytest tests

test-unit: install
	$(PY) -m pytest tests/unit

test-integration: install redis
	$(PY) -m pytest tests/integration tests/e2e

# The Redis made sure of is the one the demo uses: `--redis-url` in ARGS, else TOKENSEND_REDIS_URL.
demo: install
	url=$$(set -- $(ARGS); while [ $$# -gt 0 ]; do case "$$1" in --redis-url=*) echo "$${1#*=}";; \
	  --redis-url) echo "$${2:-}";; esac; shift; done | tail -n 1); \
	TOKENSEND_REDIS_URL="$${url:-$${TOKENSEND_REDIS_URL:-}}" scripts/ensure-redis.sh
	$(PY) -m sandbox.demo $(ARGS)

# Benchmarks and load tests: prints one table, writes bench/results/*.json.
bench: install redis
	$(PY) -m bench

clean:
	rm -rf $(VENV) node_modules libs/stubs/tokensend $(STUBS_STAMP)

# Regenerates the configuration reference in the README from the settings classes.
readme-settings: install
	$(PY) -m libs.settings_doc --write README.md
