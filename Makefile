# make test   - set up everything the tests need, then lint, types and the whole suite in two
#               lanes: the fast lane (unit + quick integration) first, stopping at the first
#               failure, then the slow lane (tests marked slow); `make test-fast` runs the first
# make lint   - ruff and mypy only
# make bench  - benchmarks, as root (see bench/README.md): ~14 min; BENCH_FULL=1 make bench: ~60 min
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# system programs the tests start for real, and the Debian package of each
SYSTEM_DEPS := curl:curl redis-server:redis-server nginx:nginx chromium:chromium systemd-analyze:systemd
# what bench.run starts besides those (gcc builds netfilterqueue for the NFQUEUE delayer;
# aria2c, wget, ab and chromium are the clients of bench.client_trials)
BENCH_DEPS := wrk:wrk nginx:nginx curl:curl ping:iputils-ping ethtool:ethtool iptables:iptables tc:iproute2 ss:iproute2 gcc:gcc aria2c:aria2 wget:wget ab:apache2-utils chromium:chromium
NFQUEUE_H := /usr/include/libnetfilter_queue/libnetfilter_queue.h

.PHONY: test test-fast lint system-deps venv bench bench-deps clean

test: system-deps venv lint
	$(PY) -m pytest -q -x -m "not slow" --durations=5
	$(PY) -m pytest -q -m slow --durations=5

test-fast: system-deps venv lint
	$(PY) -m pytest -q -x -m "not slow"

lint: venv
	$(VENV)/bin/ruff check fileproxy tests bench gunicorn.conf.py
	$(VENV)/bin/ruff format --check fileproxy tests bench gunicorn.conf.py
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy bench/records.py bench/report.py

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

bench: bench-deps
	$(PY) -m bench.chunk_sizes
	$(PY) -m bench.adaptive_cost
	$(PY) -m bench.run

bench-deps: venv
	@$(MAKE) --no-print-directory system-deps SYSTEM_DEPS="$(BENCH_DEPS)"
	@[ -f $(NFQUEUE_H) ] || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libnetfilter-queue-dev; \
	  else echo "missing: sudo apt-get install -y libnetfilter-queue-dev"; exit 1; fi; }
	$(VENV)/bin/pip install --quiet -e '.[test,bench]'

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
