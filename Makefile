# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: demo test test-fast test-services lint bench install

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	rm -f $(VENV)/.installed-*; touch $@

demo: $(STAMP)  ## the main job: a small search on the bundled digits, then export of the best config
	$(VENV)/bin/drcaps search experiments/quickstart.yaml

test: $(STAMP) test-services  ## everything CI runs: lint + the whole suite, slow end-to-end tests included
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=15

test-services:  ## what the end-to-end tests need beside the venv: a Docker engine + base images, Debian's Chromium
	bash docker/ensure-docker.sh
	sh scripts/setup-browser.sh

test-fast: $(STAMP)  ## the suite without the slow end-to-end tests
	$(PY) -m pytest -q -m "not slow" --durations=10

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py
