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
	@# multi-node launcher tests (tests/distributed/launchers): sshd + pdsh + ip inside network namespaces
	@missing=""; test -x /usr/sbin/sshd || missing="$$missing openssh-server"; \
	command -v pdsh >/dev/null || missing="$$missing pdsh"; command -v ip >/dev/null || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (Debian packages)"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "note: missing$$missing (needs root + apt-get); multi-node launcher tests will skip"; fi; \
	fi
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
