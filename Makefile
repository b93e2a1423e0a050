# Every target builds .venv from the project's own files first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/tiny.yaml

.PHONY: train test bench prepare clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# pinned: plain `torch` resolves to a multi-GB CUDA build; 2.13.0 is the CPU wheel
	$(PY) -m pip install --quiet torch==2.13.0 numpy
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

prepare: $(STAMP)
	$(PY) -m nexus prepare --config $(CONFIG)

train: $(STAMP)
	$(PY) -m nexus prepare --config $(CONFIG)
	$(PY) -m nexus train --config $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest -q --timeout=900

bench: $(STAMP)
	$(PY) -m nexus bench

clean:
	rm -rf $(VENV) runs data
