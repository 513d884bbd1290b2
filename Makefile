# Two entry points for a fresh machine: `make demo` and `make test`.
# Both set everything up first and are fast when it already is.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
DEMO_ARGS ?=
# Faults injected when `make demo` runs the local alerting chain (DEMO_FAULTS= for none).
DEMO_FAULTS ?= --inject nan@1500 --inject spike@3000

.PHONY: setup demo test lint system-packages clean dashboards docs

setup: system-packages $(STAMP)

# torch first and pinned: an unpinned torch (or one pulled in by another
# package) resolves to a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

# promtool / prometheus / alertmanager for the rule and end-to-end tests;
# docker-compose (1.29, no engine needed) for `docker-compose config` in tests/test_compose.py.
system-packages:
	@if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus-alertmanager >/dev/null 2>&1 \
	    || ! command -v docker-compose >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	      prometheus prometheus-alertmanager docker-compose; \
	    systemctl disable --now prometheus prometheus-alertmanager >/dev/null 2>&1 || true; \
	  else \
	    echo "promtool / prometheus-alertmanager / docker-compose missing: run as root or install the Debian" \
	      "packages prometheus, prometheus-alertmanager and docker-compose" >&2; \
	  fi; \
	fi

# With prometheus and prometheus-alertmanager installed, the demo also runs the
# project's alerting chain on loopback and prints each notification.
demo: setup
	@if command -v prometheus >/dev/null 2>&1 && command -v prometheus-alertmanager >/dev/null 2>&1; then \
	  set -x; $(VENV)/bin/training-exporter demo --local-alerting $(DEMO_FAULTS) $(DEMO_ARGS); \
	else \
	  echo "prometheus / prometheus-alertmanager not found: plain demo, without the alerting chain" >&2; \
	  set -x; $(VENV)/bin/training-exporter demo $(DEMO_ARGS); \
	fi

test: setup
	$(PY) -m pytest -q
	$(VENV)/bin/ruff check exporter analytics_jobs tests bench grafana docs
	$(VENV)/bin/mypy

lint: setup
	$(VENV)/bin/ruff check exporter analytics_jobs tests bench grafana docs
	$(VENV)/bin/mypy

# Regenerate grafana/dashboards/*.json from grafana/dashboards_src/ (a test fails when they differ).
dashboards: setup
	$(PY) grafana/generate.py

# Regenerate the generated sections of docs/*.md (metric tables, threshold table) from the code
# (a test fails when they differ).
docs: setup
	$(PY) docs/generate.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache .mypy_cache .ruff_cache
