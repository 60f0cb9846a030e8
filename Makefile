# Two entry points that work on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# The CPU build of torch 2.13 first when it is at hand (a plain range would pull a multi-GB CUDA build).
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.11,<2.15"
	$(BIN)/pip install -q -e ".[test]"
	# Headless Chromium for the web page test (Debian package; skipped where apt-get is unavailable).
	command -v chromium >/dev/null || ! command -v apt-get >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || true
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qwenvl demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15 tests

clean:
	rm -rf $(VENV) build *.egg-info
