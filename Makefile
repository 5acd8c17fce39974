# Two entry points, each self-installing on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch (2.13.0 is on local disk here; an unpinned torch pulls CUDA).
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# Headless Chromium for the report's browser test (Debian packages).
.PHONY: browser
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }

.PHONY: demo test
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/tasktune demo

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest
