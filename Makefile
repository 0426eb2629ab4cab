# Two commands for a fresh machine: `make demo` (main job: tokenmerge demo on the shipped testbed) and
# `make test` (test suite).
# Both create .venv and install a pinned CPU torch when the environment has none.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= outputs/demo

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/tokenmerge demo --out $(DEMO_DIR)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) outputs
