# Two commands for a fresh machine: `make demo` (main job: tokenmerge demo on the shipped testbed) and
# `make test` (test suite).
# Both create .venv and install a pinned CPU torch when the environment has none.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= outputs/demo

.PHONY: setup demo test test-oldest clean

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

# The oldest versions pyproject declares (.ci/oldest.txt): every model family, every pipeline, the tomesd parity
# and the shipped testbed, in a venv of their own.
OLDEST_VENV ?= .venv-oldest
OLDEST_TESTS ?= tests/models tests/test_pipeline_conformance.py tests/test_family_pipelines.py \
	tests/test_pipelines.py tests/test_guidance_layouts.py tests/test_tome.py tests/test_api.py tests/testbed

test-oldest:
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install -q "$$(grep '^torch==' .ci/oldest.txt)"
	$(OLDEST_VENV)/bin/python -m pip install -q -c .ci/oldest.txt -e ".[test]"
	$(OLDEST_VENV)/bin/python -m pytest -q -p no:cacheprovider $(OLDEST_TESTS)

clean:
	rm -rf $(VENV) $(OLDEST_VENV) outputs
