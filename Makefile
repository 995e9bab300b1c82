# make test   - set up everything the tests need, then run lint, types and the whole suite
# make lint   - ruff and mypy only
# make bench  - benchmarks (see bench/README.md)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# system programs the tests start for real, and the Debian package of each
SYSTEM_DEPS := curl:curl redis-server:redis-server nginx:nginx chromium:chromium systemd-analyze:systemd

.PHONY: test lint system-deps venv bench clean

test: system-deps venv lint
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check fileproxy tests bench gunicorn.conf.py
	$(VENV)/bin/ruff format --check fileproxy tests bench gunicorn.conf.py
	$(VENV)/bin/mypy

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Python >= 3.11 is required: set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

system-deps:
	@missing=""; \
	for pair in $(SYSTEM_DEPS); do \
	  bin=$${pair%%:*}; pkg=$${pair#*:}; \
	  command -v $$bin >/dev/null 2>&1 || [ -x /usr/sbin/$$bin ] || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else \
	    echo "missing system packages; install them with:"; \
	    echo "    sudo apt-get install -y$$missing"; \
	    exit 1; \
	  fi; \
	fi

bench: venv
	$(PY) -m bench.chunk_sizes
	$(PY) -m bench.adaptive_cost

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
