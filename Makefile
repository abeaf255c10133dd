# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

# torch comes from the local wheels this machine's pip is pinned to (torch==2.14.1,
# torchvision==0.29.1); everything else is a normal PyPI install. Nothing downloads at run time.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/megavid make-synthetic experiment=demo
	$(VENV)/bin/megavid pretrain experiment=demo --overwrite
	$(VENV)/bin/megavid eval-zeroshot experiment=demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# developers: skip the slow and multi-process tests (CI runs everything)
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not distributed" $(PYTEST_ARGS)

clean:
	rm -rf runs data/synthetic .pytest_cache
