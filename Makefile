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
# A fresh .venv takes ~6.7 GiB (torch 2.14.1 is a CUDA build); say so before pip runs out of
# space half way (a CI machine once had less free: "OSError: [Errno 28] No space left on device").
NEED_KIB := 7340032

$(STAMP): setup.py
	@test -x $(PY) || { avail=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
	  if [ "$$avail" -lt $(NEED_KIB) ]; then \
	    echo "make: a new $(VENV) needs about 7 GiB (torch's CUDA build alone is 5.5 GiB) but" \
	      "only $$((avail / 1048576)) GiB are free on $$(df -P . | awk 'NR==2 {print $$6}');" \
	      "free some space and run make again" >&2; exit 1; fi; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	@# multi-node launcher tests (tests/distributed/launchers): sshd + pdsh + ip inside network namespaces;
	@# apt-get waits up to 10 min for the dpkg lock (unattended-upgrades, a parallel setup) instead of failing;
	@# `apt-get update` ignores DPkg::Lock::Timeout for its package lists lock (apt 2.6), so it is retried
	@missing=""; test -x /usr/sbin/sshd || missing="$$missing openssh-server"; \
	command -v pdsh >/dev/null || missing="$$missing pdsh"; command -v ip >/dev/null || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (Debian packages)"; \
	    for i in $$(seq 120); do \
	      out=$$(apt-get -o DPkg::Lock::Timeout=600 update -qq 2>&1) && break; \
	      case "$$out" in *"Could not get lock"*) ;; *) i=120 ;; esac; \
	      if [ $$i -ge 120 ]; then echo "$$out" >&2; exit 1; fi; \
	      [ $$i -gt 1 ] || echo "apt-get update: another apt holds the package lists lock; waiting up to 10 min" >&2; \
	      sleep 5; \
	    done; \
	    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
	      $$missing >/dev/null; \
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
