# The front door: `make run` starts Scalarium on its embedded defaults, `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Debian packages the tests use: goiardi (Chef Server API), ruby (ruby -c on cookbooks and solo.rb),
# shellcheck (install.sh), openssl, git, curl, iproute2 (network namespaces for e2e tests).
DEBIAN_TEST_PACKAGES := goiardi ruby shellcheck openssl git curl iproute2 procps util-linux hostname

# The pure modules (and a few edges) that must stay mypy clean.
TYPED := chef_bridge server/pki.py server/credentials.py server/scripts.py server/agent_auth.py server/wakeups.py \
	server/deployments.py server/schemas.py server/lifecycle.py server/fanout.py server/cluster.py \
	server/orchestrator.py server/effects.py

.PHONY: run test lint typecheck install system-packages services bench clean cookbooks-syntax

run: $(STAMP)
	$(BIN)/scalarium up

test: $(STAMP) system-packages services
	$(BIN)/ruff check server chef_bridge bootstrap tests bench
	$(BIN)/mypy $(TYPED)
	$(MAKE) --no-print-directory cookbooks-syntax
	$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,postgres,test]'
	touch $(STAMP)

# Installs only what is missing, so a machine that has everything spends no time here.
system-packages:
	@missing=""; for p in $(DEBIAN_TEST_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# PostgreSQL and Redis run on this kind of machine; start them when they are stopped.
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 || { \
	  echo "starting PostgreSQL"; \
	  pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | head -1) main start; \
	  for i in $$(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done; }
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || { \
	  echo "starting Redis"; mkdir -p /var/lib/redis /var/log/redis; \
	  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
	    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log; \
	  for i in $$(seq 50); do redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 && break; sleep 0.2; done; }

cookbooks-syntax:
	@files=$$(find cookbooks -name '*.rb' 2>/dev/null); \
	if [ -n "$$files" ]; then for f in $$files; do ruby -c "$$f" >/dev/null || exit 1; done; \
	  echo "ruby -c: $$(echo $$files | wc -w) cookbook files OK"; fi

lint: $(STAMP)
	$(BIN)/ruff check server chef_bridge bootstrap tests bench
	$(BIN)/ruff format --check server chef_bridge bootstrap tests bench

typecheck: $(STAMP)
	$(BIN)/mypy $(TYPED)

# wrk (Debian) drives the HTTP benchmarks; without it they fall back to a Python client.
bench: $(STAMP) services
	@dpkg -s wrk >/dev/null 2>&1 || { echo "installing Debian package: wrk"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .mypy_cache
