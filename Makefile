# Two commands on a fresh machine with Python 3.11, bash and make:
#   make demo   build PL-Net and train it for a few steps on generated images
#   make test   install what the tests need and run the whole suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,test

.PHONY: install demo test benchmarks clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.py
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/reid-demo

test: install
	$(BIN)/pytest -q

benchmarks: install
	$(BIN)/python benchmarks/part_partition.py

clean:
	rm -rf $(VENV) build *.egg-info
