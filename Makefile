# gokiq: `make run` starts the demo stack, `make test` runs every test. Both install what is
# missing first (Debian packages with apt-get, Python packages into .venv).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := redis-server ruby ruby-sidekiq ruby-sidekiq-cron ruby-fugit ruby-rails puma \
	ruby-sqlite3 ruby-rack-test ruby-minitest docker-compose postgresql

.PHONY: test run lint format deps system-deps bench clean

deps: system-deps $(VENV)/.installed

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; fi

# The runtime dependencies are pinned by requirements.lock (what the Docker image installs too),
# so every machine runs the versions the tests ran; regenerate it with docker/lock.py.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'
	touch $@

test: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	ruby rails_sidecar/test/run.rb
	$(BIN)/pytest -p no:cacheprovider -q tests

# The demo stack (scripts/run_demo.sh): Redis (an existing one is left untouched), the sidecar on
# the example app, gokiq-bridge, a Celery worker, Flower, and a few demo jobs. Ctrl-C stops it.
run: deps
	@scripts/run_demo.sh

lint: deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: deps
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: deps
	$(BIN)/python bench/worker.py
	$(BIN)/python bench/bridge.py
	ruby bench/sidecar.rb
	$(BIN)/python bench/e2e.py
	$(BIN)/python bench/vs_sidekiq.py
	$(BIN)/python bench/history.py
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .run *.egg-info
